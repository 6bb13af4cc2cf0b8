#!/usr/bin/env python
"""Cold start with and without the compile cache: start the service twice, report time-to-ready.

    python tools/cold_start.py --model synthetic-full --optimizations qkv_fusion,attention,compile --warmup 1024x1024
    python tools/cold_start.py --model tiny --device cpu --optimizations compile --warmup 256x256   # CPU check

Each start is a fresh process (nothing shared but the cache directory): load the model, prepare the
optimisations, warm up the given shapes (compile / capture), then report seconds to ready, split into imports,
model load, each optimisation's preparation and the warm-up, and the compile-cache state (artifacts loaded,
inductor FX-graph cache hits and misses). The first start uses an empty cache directory
(unless --cache-dir names one) and saves the artifacts; the second loads them. By default each start gets its own
empty inductor cache directory, so only the portable mega-cache file can make the second start warm (a new
machine or container); `--same-machine` keeps the server's default instead (inductor's cache under the cache
directory, as on a restart on the same machine or volume). Python's bytecode follows the server's default (on an
image that does not keep it, it is cached under the cache directory: bytecode_cache.py); --no-bytecode-cache and
--bytecode-prefix measure the two other cases. Prints a JSON report.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from kontext_server import settings
from kontext_server.request import parse_warmup_sizes  # pydantic only: the parent stays light

CHILD = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    for name in {hide!r}:  # as if not installed: importlib's find_spec answers None for a None entry
        sys.modules[name] = None
    from kontext_server.service import FluxService, ServiceConfig
    import_s = time.perf_counter() - t0
    import logging
    bypassed = []  # why AOTAutograd's cache was bypassed (it logs the reason at INFO)

    class Bypass(logging.Handler):
        def emit(self, record):
            bypassed.append(record.getMessage()[:300])

    aot_log = logging.getLogger("torch._functorch._aot_autograd.autograd_cache")
    aot_log.setLevel(logging.INFO)
    aot_log.addHandler(Bypass(logging.INFO))
    svc = FluxService(ServiceConfig(model={model!r}, device={device!r}, optimizations={opts!r}, cache_dir={cache!r},
                                    warmup_sizes={sizes!r}))
    svc.load()
    ready = time.perf_counter() - t0
    h = svc.health()
    prepare_s = {{k: v["prepare_seconds"] for k, v in h["optimizations"].items() if v["prepared"]}}
    try:  # where the warm-up's compile time went (dynamo's own timers, seconds summed over all compiled frames)
        from torch._dynamo.utils import compile_times
        names, values = compile_times(repr="csv", aggregate=True)
        compile_s = {{n: round(float(v), 2) for n, v in zip(names, values) if float(v) >= 0.01}}
    except Exception as exc:
        compile_s = {{"unavailable": repr(exc)}}
    print("RESULT " + json.dumps({{"ready_s": round(ready, 2), "import_s": round(import_s, 2),
                                  "load_s": h["model"]["load_seconds"], "prepare_s": prepare_s,
                                  "warmup_ms": h["warmup_ms_total"], "compile_cache": h.get("compile_cache"),
                                  "bytecode_cache": h.get("bytecode_cache"),
                                  "aot_autograd_log": [m for m in bypassed if "ypass" in m][:10],
                                  "dynamo_compile_s": compile_s}}))
""")


def start_once(args, cache_dir: Path, inductor_dir: Path) -> dict:
    code = CHILD.format(model=args.model, device=args.device, opts=args.optimizations,
                        cache=str(cache_dir), sizes=parse_warmup_sizes(args.warmup),
                        hide=[n for n in args.hide_packages.split(",") if n])
    # The cache directory by env too: the bytecode cache picks it up when service is imported, before the config.
    env = settings.environ_with(FLUX_LOG_LEVEL="WARNING", FLUX_CACHE_DIR=str(cache_dir))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    if args.bytecode_prefix:  # as on an image whose packages keep their bytecode (see --bytecode-prefix)
        env["PYTHONPYCACHEPREFIX"] = args.bytecode_prefix
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    elif args.no_bytecode_cache:
        env["FLUX_BYTECODE_CACHE"] = "0"
    if not args.same_machine:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_dir)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=args.timeout)
    if out.returncode != 0:
        raise SystemExit(f"start failed ({out.returncode}):\n{out.stderr[-4000:]}")
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="synthetic-full")
    p.add_argument("--device", default="cuda")
    p.add_argument("--optimizations", default="qkv_fusion,attention,compile")
    p.add_argument("--warmup", default="1024x1024", help="shapes to warm up: WxH or edit:WxH, comma-separated")
    p.add_argument("--hide-packages", default="",
                   help="comma list of installed packages each start treats as absent, e.g. peft: the GPU image has "
                        "it preinstalled, our requirements do not install it, and diffusers imports it when present")
    p.add_argument("--cache-dir", help="default: a new empty directory")
    p.add_argument("--same-machine", action="store_true",
                   help="let both starts share inductor's cache under --cache-dir (the server's default)")
    bytecode = p.add_mutually_exclusive_group()  # default: the server's own bytecode cache
    bytecode.add_argument("--no-bytecode-cache", action="store_true",
                          help="FLUX_BYTECODE_CACHE=0: on an image without .pyc files, both starts compile Python's "
                               "bytecode")
    bytecode.add_argument("--bytecode-prefix",
                          help="both starts write and read bytecode in this directory (PYTHONPYCACHEPREFIX, "
                               "bytecode writes on), as on an image that ships it: run twice with the same directory, "
                               "and the second run measures starts whose imports are already compiled")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cold-start-"))
    cache_dir = Path(a.cache_dir) if a.cache_dir else work / "cache"
    first = start_once(a, cache_dir, work / "inductor-1")
    second = start_once(a, cache_dir, work / "inductor-2")
    report = {"model": a.model, "device": a.device, "optimizations": a.optimizations, "warmup": a.warmup,
              "hidden_packages": a.hide_packages,
              "bytecode": (f"precompiled prefix {a.bytecode_prefix}" if a.bytecode_prefix
                           else "no cache (FLUX_BYTECODE_CACHE=0)" if a.no_bytecode_cache else "server default"),
              "inductor_cache": "shared (same machine)" if a.same_machine else "fresh per start (new machine)",
              "first": first, "second": second,
              "second_over_first": round(second["ready_s"] / first["ready_s"], 3)}
    print(json.dumps(report, indent=1))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
