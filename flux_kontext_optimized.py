"""FLUX.1-Kontext inference server: composition root and CLI.

    python flux_kontext_optimized.py                      # benchmark: unoptimised vs optimised (model from env or tiny)
    python flux_kontext_optimized.py serve --model tiny --port 8000
    python flux_kontext_optimized.py generate --prompt "make the car red" --image in.png --out out.png
    python flux_kontext_optimized.py benchmark --model synthetic-full --workload edit-1024
    uvicorn flux_kontext_optimized:app                    # configured by env (FLUX_MODEL, FLUX_OPTIMIZATIONS, ...)

The pieces: model_sources (where weights come from), optimizations/ (one module each, ordered registry),
service.FluxService (load -> optimise -> generate), engine (bounded queue, one GPU worker), api (routes),
schemas (validation), benchmark (the same service, timed).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import bytecode_cache

bytecode_cache.enable()  # before fastapi, torch and diffusers are imported: see bytecode_cache.py

from api import ServerSettings, create_app
from model_sources import ModelLoadError
from schemas import parse_warmup_sizes
from service import NEW_SHAPE_POLICIES, FluxService, ServiceConfig

__all__ = ["FluxService", "ServiceConfig", "create_app", "app", "main"]
log = logging.getLogger("flux")


def _warmup_sizes_arg(spec: str) -> list[tuple[int, int, bool]]:
    try:
        return parse_warmup_sizes(spec)
    except ValueError as exc:  # argparse shows an ArgumentTypeError's message (a ValueError's only as "invalid")
        raise argparse.ArgumentTypeError(str(exc)) from None


def config_from_env() -> tuple[ServiceConfig, ServerSettings]:
    """What `serve` with no arguments would use: the CLI's defaults, which come from the FLUX_* variables."""
    a = build_parser().parse_args(["serve"])
    return _service_config(a), _server_settings(a)


class _LazyApp:
    """`uvicorn flux_kontext_optimized:app`: the app is built on first use, from env, so importing this module
    (tests, the CLI) loads nothing."""

    _app = None

    def _get(self):
        if self._app is None:
            cfg, settings = config_from_env()
            type(self)._app = create_app(FluxService(cfg), settings)
        return self._app

    async def __call__(self, scope, receive, send):
        await self._get()(scope, receive, send)


app = _LazyApp()


def _add_model_args(p: argparse.ArgumentParser, default_opts: str | None = "auto") -> None:
    p.add_argument("--model", default=os.environ.get("FLUX_MODEL", "tiny"),
                   help="tiny | synthetic-full | hub id | local directory (env FLUX_MODEL)")
    p.add_argument("--device", default=os.environ.get("FLUX_DEVICE"), help="cuda, cuda:1, cpu (default: auto)")
    p.add_argument("--optimizations", default=os.environ.get("FLUX_OPTIMIZATIONS", default_opts),
                   help="all | none | auto | comma list of: compile,qkv_fusion,channels_last,modulation_table,"
                        "first_block_cache,attention,low_precision,dpm_solver,cuda_graphs")
    p.add_argument("--compile-mode", default=os.environ.get("FLUX_COMPILE_MODE", "default"),
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    p.add_argument("--compile-scope", default=os.environ.get("FLUX_COMPILE_SCOPE", "regional"),
                   choices=["regional", "full"], help="compile each transformer block (fast to compile) or one graph")
    p.add_argument("--inductor-flags", default=os.environ.get("FLUX_INDUCTOR_FLAGS", "light"),
                   choices=["none", "light", "seed"],
                   help="light: the seed's flags without coordinate-descent tuning (default); seed: all of them "
                        "(much slower compile)")
    p.add_argument("--cache-dir", default=os.environ.get("FLUX_CACHE_DIR"))


def _service_config(a) -> ServiceConfig:
    return ServiceConfig(model=a.model, device=a.device, optimizations=a.optimizations, compile_mode=a.compile_mode,
                         compile_scope=a.compile_scope, inductor_flags=a.inductor_flags,
                         cache_dir=Path(a.cache_dir) if a.cache_dir else None,
                         warmup_sizes=getattr(a, "warmup", None) or [],
                         new_shapes=getattr(a, "new_shapes", None) or "compile")


def _server_settings(a) -> ServerSettings:
    return ServerSettings(max_queue=a.max_queue, queue_timeout=a.queue_timeout, request_timeout=a.request_timeout,
                          shutdown_grace=a.shutdown_grace)


def _load_or_exit(cfg: ServiceConfig) -> FluxService:
    svc = FluxService(cfg)
    try:
        svc.load()
    except ModelLoadError as exc:
        sys.exit(f"error: {exc}")
    return svc


def cmd_serve(a) -> None:
    import uvicorn

    settings = _server_settings(a)
    svc = FluxService(_service_config(a))
    if not a.background_load:
        try:  # fail at start-up, with the message, when the model cannot be found
            svc.load()
        except ModelLoadError as exc:
            sys.exit(f"error: {exc}")
    # uvicorn re-raises SIGTERM after its graceful shutdown; this handler, restored by then, makes a clean drain
    # exit with status 0 instead of dying of the signal.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Work still running after the grace period is interrupted by the app (JSON 503); the margin lets that answer
    # reach the client before uvicorn's own timeout cancels the handlers.
    uvicorn.run(create_app(svc, settings), host=a.host, port=a.port, log_level=a.log_level,
                timeout_graceful_shutdown=int(a.shutdown_grace) + 5)


def cmd_generate(a) -> None:
    from schemas import InferenceRequest
    from utils import decode_image
    import base64

    image = decode_image(base64.b64encode(Path(a.image).read_bytes()).decode()) if a.image else None
    req = InferenceRequest(prompt=a.prompt, width=a.width, height=a.height, steps=a.steps, seed=a.seed,
                           guidance_scale=a.guidance_scale)
    svc = _load_or_exit(_service_config(a))
    res = svc.generate(req, image)
    res.images[0].save(a.out)
    print(json.dumps({"out": a.out, "seed": res.seed, "width": res.width, "height": res.height, "steps": res.steps,
                      "timings_ms": res.timings_ms,
                      "optimizations": {k: d.applied for k, d in res.optimizations.items()}}, indent=1))


def cmd_benchmark(a) -> None:
    import benchmark
    from tqdm import tqdm

    svc = _load_or_exit(_service_config(a))
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = a.stages.split(",") if a.stages else None
    n = len([s for s in benchmark.stage_plan() if stages is None or s.name in stages]) if a.workload else 3
    bar = tqdm(total=n, desc=a.workload or "benchmark", file=sys.stderr)

    def progress(msg: str) -> None:  # called as each stage starts: the bar counts stages started
        bar.update(1)
        bar.set_postfix_str(msg[:50])

    if a.workload:
        result = benchmark.run_stage_benchmark(svc, a.workload, runs=a.runs, steps=a.steps, progress=progress,
                                               stages=stages)
        name = a.workload
    else:
        result = benchmark.run_request_benchmark(svc, runs=a.runs, steps=a.steps, width=a.width, height=a.height,
                                                 edit=a.edit, progress=progress)
        name = "request-benchmark"
    bar.close()
    md = benchmark.to_markdown(result)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    benchmark.bar_chart(result, str(out_dir / f"{name}.png"))
    print(f"\n{result.get('workload', 'benchmark')} | model {result['model']} | device {result['device']} | "
          f"torch {result['torch']}\n")
    print(md)
    print(f"\nJSON: {out_dir / (name + '.json')}  chart: {out_dir / (name + '.png')}")


def build_parser() -> argparse.ArgumentParser:
    """The CLI; every default that has a FLUX_* variable reads it here (and only here)."""
    p = argparse.ArgumentParser(prog="flux_kontext_optimized.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the HTTP server")
    _add_model_args(s)
    s.add_argument("--host", default=os.environ.get("FLUX_HOST", "127.0.0.1"))
    s.add_argument("--port", type=int, default=int(os.environ.get("FLUX_PORT", 8000)))
    s.add_argument("--max-queue", type=int, default=int(os.environ.get("FLUX_MAX_QUEUE", 16)))
    s.add_argument("--queue-timeout", type=float, default=float(os.environ.get("FLUX_QUEUE_TIMEOUT", 120)))
    s.add_argument("--request-timeout", type=float, default=float(os.environ.get("FLUX_REQUEST_TIMEOUT", 600)))
    s.add_argument("--shutdown-grace", type=float, default=float(os.environ.get("FLUX_SHUTDOWN_GRACE", 30)))
    s.add_argument("--warmup", type=_warmup_sizes_arg, default=os.environ.get("FLUX_WARMUP_SIZES"),
                   help="request shapes to compile / capture before serving: WxH (text-to-image) or edit:WxH "
                        "(with a reference image), comma-separated, e.g. 1024x1024,edit:1024x1024")
    s.add_argument("--new-shapes", choices=NEW_SHAPE_POLICIES, default=os.environ.get("FLUX_NEW_SHAPES", "compile"),
                   help="a request at a shape --warmup did not compile: compile it then (the worker and the queue "
                        "wait; default) or run it uncompiled (eager), which the response reports")
    s.add_argument("--background-load", action="store_true",
                   help="answer /live at once and load the model in the background (/health 503 until ready)")
    s.add_argument("--log-level", default="info")
    s.set_defaults(fn=cmd_serve)

    g = sub.add_parser("generate", help="one image to a file")
    _add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--image")
    g.add_argument("--out", required=True)
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--guidance-scale", type=float, default=2.5)
    g.set_defaults(fn=cmd_generate)

    b = sub.add_parser("benchmark", help="stage table (--workload) or unoptimised vs optimised")
    _add_model_args(b, default_opts=None)
    b.add_argument("--workload", choices=["edit-1024", "t2i-1024", "edit-512"])
    b.add_argument("--stages", help="comma list of stage names (default: all)")
    b.add_argument("--runs", type=int, default=None, help="timed runs per row (default 5 with --workload, else 3)")
    b.add_argument("--steps", type=int, default=None)
    b.add_argument("--width", type=int, default=256)
    b.add_argument("--height", type=int, default=256)
    b.add_argument("--edit", action="store_true")
    b.add_argument("--out-dir", default=os.environ.get("FLUX_BENCH_DIR", "benchmarks/latest"))
    b.set_defaults(fn=cmd_benchmark)
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("FLUX_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # the seed script's behaviour: unoptimised vs optimised on the configured model
        argv = ["benchmark"]
    p = build_parser()
    a = p.parse_args(argv)
    if a.cmd == "benchmark" and a.optimizations is None:
        # The stage table starts from the naive model and prepares stage by stage; the request benchmark compares
        # what a server started with `auto` would have.
        a.optimizations = "none" if a.workload else "auto"
    if a.cmd == "benchmark" and a.workload and a.optimizations != "none":
        p.error("--workload prepares optimisations stage by stage: leave --optimizations unset (or none)")
    if a.cmd == "benchmark" and a.steps is None:
        a.steps = 28 if a.workload else 4
    if a.cmd == "benchmark" and a.runs is None:
        a.runs = 5 if a.workload else 3
    a.fn(a)


if __name__ == "__main__":
    main()
