"""Probe: does torch.compile(...).aot_compile work for the transformer blocks on this torch, and what does a load
cost against dynamo's warm path? Runs `save` and `load` phases in fresh processes (tiny model)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from kontext_server import settings

def phase(mode: str, art: str, device: str) -> dict:
    t0 = time.perf_counter()
    import torch
    from kontext_server.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline().to(device)
    tr = pipe.transformer.eval()
    out = {"mode": mode, "torch": torch.__version__, "import_build_s": time.perf_counter() - t0}
    captured = {}

    def hook(mod, args, kwargs):
        captured.setdefault(type(mod).__name__, (mod, args, kwargs))

    hs = [b.register_forward_pre_hook(hook, with_kwargs=True)
          for b in list(tr.transformer_blocks) + list(tr.single_transformer_blocks)]
    with torch.no_grad():
        pipe(prompt="a", width=256, height=256, num_inference_steps=1, output_type="latent",
             generator=torch.Generator(device).manual_seed(0))
    for h in hs:
        h.remove()
    from optimizations.compiling.aot_regions import _serialisable_guards

    dropped = []

    def guard_filter(entries):  # the service's filter, recording the local guards it drops
        keep = _serialisable_guards(entries)
        dropped.extend(f"{e.guard_type} {e.name}" for e, k in zip(entries, keep) if not k and not e.is_global)
        return keep

    os.makedirs(art, exist_ok=True)
    with torch.no_grad():
        for name, (m, a, kw) in captured.items():
            f = os.path.join(art, name + ".bin")
            t = time.perf_counter()
            if mode == "save":
                with torch._dynamo.config.patch(enable_aot_compile=True):  # off by default on torch 2.11
                    compiled = torch.compile(m.forward, fullgraph=True, dynamic=False,
                                             options={"guard_filter_fn": guard_filter})
                    c = compiled.aot_compile((a, kw))
                c.save_compiled_function(f)
            elif mode == "load":
                with open(f, "rb") as fh:
                    c = torch.compiler.load_compiled_function(fh)
            else:  # dynamo's usual warm path, for comparison (inductor cache shared with `save`)
                c = torch.compile(m.forward, fullgraph=True, dynamic=False)
            out[name + "_get_s"] = time.perf_counter() - t
            other = (tr.transformer_blocks if name == "FluxTransformerBlock" else tr.single_transformer_blocks)[-1]
            t = time.perf_counter()
            if mode == "dynamo":
                got = c(**kw)
            else:
                out[name + "_guard_other"] = bool(c.guard_check(other, *a, **kw))
                got = c(m, *a, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            out[name + "_first_call_s"] = time.perf_counter() - t
            ref = m(*a, **kw)
            ref, got = [x if isinstance(x, tuple) else (x,) for x in (ref, got)]
            out[name + "_max_abs_diff"] = max(float((x - y).abs().max()) for x, y in zip(ref, got))
    out["dropped_local_guards"] = sorted(set(dropped))
    out["total_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["save", "load", "dynamo"])
    ap.add_argument("--art", default="/tmp/aot-probe")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.phase:
        print("RESULT " + json.dumps(phase(args.phase, args.art, args.device)))
        return
    results = []
    env = settings.environ_with(TORCHINDUCTOR_CACHE_DIR=args.art + "/inductor")
    for p in ("save", "load", "dynamo", "load"):
        r = subprocess.run([sys.executable, __file__, "--phase", p, "--art", args.art, "--device", args.device],
                           capture_output=True, text=True, env=env)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        results.append(json.loads(line[-1][7:]) if line else {"mode": p, "rc": r.returncode,
                                                              "stderr": r.stderr[-3000:]})
        print(json.dumps(results[-1], indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
