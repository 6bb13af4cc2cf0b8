#!/usr/bin/env python
"""Save a FLUX transformer as one single file in Black Forest Labs' layout, and measure loading it: seconds and the
peak host memory (the resident-set high-water mark of the load), against the file's size.

    # on the GPU machine: synthetic-full's transformer (random weights, ~24 GB in bf16), then its load
    python tools/single_file_load.py save --model synthetic-full --device cuda --out /tmp/flux-bfl.safetensors
    python tools/single_file_load.py measure --transformer /tmp/flux-bfl.safetensors --device cuda
    # an fp8 file (row-wise scales), loaded by the server with the fp8 copy prepared: the detail says what it reused
    python tools/single_file_load.py save --model synthetic-full --device cuda --fp8 row --out /tmp/flux-fp8.safetensors
    python tools/single_file_load.py measure --transformer /tmp/flux-fp8.safetensors --device cuda \\
        --model synthetic-full --optimizations qkv_fusion,low_precision

    # on a CPU: a full-width model with 1 double and 2 single blocks (~1.3 GB in bf16)
    python tools/single_file_load.py save --layers 1,2 --out /tmp/flux-small.safetensors
    python tools/single_file_load.py measure --transformer /tmp/flux-small.safetensors --baseline

`save` builds the transformer (`synthetic-full`: the real config, random weights, built on --device; `--layers D,S`:
the same width with D double and S single blocks; `tiny`: the tiny test model), writes its weights in BFL's keys
(`to_bfl`, the inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers) and, with `--fp8`, its block
linears in fp8 e4m3 with per-row, per-tensor or no scales. Saving holds the file's tensors in host memory once.
`measure` loads the file in this fresh process: the transformer alone through the server's loader
(kontext_server.models.single_file), or with `--model` the whole pipeline through `load_model`, or with
`--optimizations` a FluxService (its /health). `--baseline` also measures diffusers' own
`FluxTransformer2DModel.from_single_file(path)` on the same file, in a second fresh process (full width only:
diffusers' converter assumes FLUX's width). Prints one JSON report.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

FP8_MAX = 448.0


# ---- BFL layout ------------------------------------------------------------------------------------------------------
def to_bfl(state: dict) -> dict:
    """A diffusers FluxTransformer2DModel state dict in BFL's original keys (consumes `state`)."""
    import torch

    top = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
           "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
    double = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "ff.net.0.proj": "img_mlp.0",
              "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
              "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj"}
    double_norms = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
    single = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
    single_norms = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
    out = {}

    def rename(src, dst):
        for p in ("weight", "bias"):
            if f"{src}.{p}" in state:
                out[f"{dst}.{p}"] = state.pop(f"{src}.{p}")

    def join(srcs, dst):
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = torch.cat([state.pop(f"{s}.{p}") for s in srcs])

    for src, dst in top.items():
        rename(src, dst)
    for p in ("weight", "bias"):
        scale, shift = state.pop(f"norm_out.linear.{p}").chunk(2)  # diffusers (scale, shift) -> BFL (shift, scale)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    for i in sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}):
        a, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        join([a + "attn.to_q", a + "attn.to_k", a + "attn.to_v"], b + "img_attn.qkv")
        join([a + "attn.add_q_proj", a + "attn.add_k_proj", a + "attn.add_v_proj"], b + "txt_attn.qkv")
        for src, dst in double.items():
            rename(a + src, b + dst)
        for src, dst in double_norms.items():
            out[b + dst + ".scale"] = state.pop(a + src + ".weight")
    for i in sorted({int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")}):
        a, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        join([a + "attn.to_q", a + "attn.to_k", a + "attn.to_v", a + "proj_mlp"], b + "linear1")
        for src, dst in single.items():
            rename(a + src, b + dst)
        for src, dst in single_norms.items():
            out[b + dst + ".scale"] = state.pop(a + src + ".weight")
    if state:
        raise ValueError(f"keys the BFL mapping does not know: {sorted(state)[:5]}")
    return out


def quantize_fp8(bfl: dict, scaling: str) -> dict:
    """The block linears' weights in fp8 e4m3: `row` (one scale per output row, `<module>.weight_scale`), `tensor`
    (one scale, `<module>.scale_weight`, ComfyUI's scaled fp8) or `none` (a plain cast)."""
    import torch

    out = {}
    for key, t in bfl.items():
        if not (key.startswith(("double_blocks.", "single_blocks.")) and key.endswith(".weight") and t.dim() == 2):
            out[key] = t
            continue
        w = t.float()
        module = key[: -len(".weight")]
        if scaling == "none":
            out[key] = w.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            continue
        amax = w.abs().amax(dim=1, keepdim=True) if scaling == "row" else w.abs().amax()
        scale = amax.clamp(min=1e-12) / FP8_MAX
        out[key] = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        if scaling == "row":
            out[module + ".weight_scale"] = scale.reshape(-1)
        else:
            out[module + ".scale_weight"] = scale.reshape(())
    if scaling == "tensor":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


# ---- save ------------------------------------------------------------------------------------------------------------
def build_transformer(model: str, device: str, layers: str | None):
    import torch
    from diffusers import FluxTransformer2DModel

    from kontext_server.models.config import full_configs
    from kontext_server.models.synthetic import building_on

    if model == "tiny":
        from kontext_server.models.tiny import build_tiny_pipeline

        return build_tiny_pipeline().transformer.to(device)
    cfg = dict(full_configs()["transformer"])
    if layers:
        cfg["num_layers"], cfg["num_single_layers"] = (int(x) for x in layers.split(","))
    torch.manual_seed(0)
    with building_on(device, torch.bfloat16):
        return FluxTransformer2DModel(**cfg)


def cmd_save(a) -> dict:
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    module = build_transformer(a.model, a.device, a.layers)
    config = {k: v for k, v in module.config.items() if not k.startswith("_")}
    state = {k: v.detach() for k, v in module.state_dict().items()}
    del module
    bfl = to_bfl(state)
    if a.fp8 != "off":
        bfl = quantize_fp8(bfl, a.fp8)
    cpu = {k: v.to("cpu").contiguous() for k, v in bfl.items()}
    del bfl
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    # the model's config rides along in the metadata, for `measure` (BFL's files carry none: the server takes it
    # from --model or its bundled one)
    save_file(cpu, a.out, metadata={"format": "pt", "made_by": "tools/single_file_load.py",
                                    "config": json.dumps(config)})
    return {"saved": a.out, "bytes": Path(a.out).stat().st_size, "tensors": len(cpu), "fp8": a.fp8,
            "seconds": round(time.perf_counter() - t0, 1)}


# ---- measure ---------------------------------------------------------------------------------------------------------
def measure_here(a) -> dict:
    """The load, in this process (started fresh for it)."""
    import diffusers  # noqa: F401  (imported before the measurement: it measures the load, not the imports)
    import torch

    from kontext_server.models import host_memory, single_file
    from kontext_server.service import FluxService  # noqa: F401

    t0 = time.perf_counter()
    size = Path(a.transformer).stat().st_size
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    report: dict = {"file": a.transformer, "file_gib": host_memory.gib(size), "device": a.device, "loader": a.loader}
    config_dir = _config_dir(a.transformer)
    with host_memory.measure() as mem:
        if a.loader == "diffusers":
            from diffusers import FluxTransformer2DModel

            module = FluxTransformer2DModel.from_single_file(a.transformer, config=str(config_dir),
                                                             subfolder="transformer", local_files_only=True,
                                                             dtype=dtype, device=a.device)
            extra = {"parameters": sum(p.numel() for p in module.parameters())}
        elif a.optimizations:
            from kontext_server.service import FluxService, ServiceConfig

            svc = FluxService(ServiceConfig(model=a.model or "synthetic-full", transformer=a.transformer,
                                            device=a.device, optimizations=a.optimizations))
            svc.load()
            health = svc.health()
            extra = {"model": health["model"], "optimizations": {k: v["detail"] for k, v in
                                                                 health["optimizations"].items() if v["prepared"]}}
        elif a.model:
            from kontext_server.models import sources

            loaded = sources.load_model(a.model, a.device, transformer=a.transformer)
            extra = {"model": {"load_seconds": round(loaded.load_seconds, 2), "stages": loaded.stage_seconds,
                               "host_memory": loaded.host_memory, "transformer_file": loaded.transformer_file}}
        else:
            loaded = single_file.load_transformer(a.transformer, a.device, dtype, config_dir)
            extra = {"transformer_file": loaded.report}
    seconds = time.perf_counter() - t0
    mem_gib = host_memory.summary(mem.result)
    report.update(seconds=round(seconds, 2), host_memory=mem_gib, **extra)
    increase = mem.result.get("peak_rss_increase_bytes")
    if increase is not None:
        report["peak_rss_increase_over_file_size"] = round(increase / size, 3)
    if a.device.startswith("cuda"):
        report["gpu_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return report


def _config_dir(path: str) -> Path:
    """A directory with `transformer/config.json` for both loaders: the config `save` recorded in the file's
    metadata, else the bundled FLUX.1-Kontext-dev transformer config."""
    import tempfile

    from kontext_server.models.config import full_configs
    from kontext_server.models.safetensors_file import SafetensorsFile

    recorded = SafetensorsFile.open(path).metadata.get("config")
    config = json.loads(recorded) if recorded else full_configs()["transformer"]
    d = Path(tempfile.mkdtemp(prefix="flux-config-"))
    (d / "transformer").mkdir()
    (d / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **config}))
    return d


def cmd_measure(a) -> dict:
    """Each measured load in its own fresh process, so one load's peak cannot hide another's."""
    runs = ["server"] + (["diffusers"] if a.baseline else [])
    out = {}
    for loader in runs:
        args = [sys.executable, __file__, "measure-here", "--transformer", a.transformer, "--device", a.device,
                "--dtype", a.dtype, "--loader", loader]
        if loader == "server":
            args += (["--model", a.model] if a.model else []) + (["--optimizations", a.optimizations]
                                                                 if a.optimizations else [])
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"measure ({loader}) failed:\n{proc.stderr[-4000:]}")
        out[loader] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="write a transformer as one BFL-layout .safetensors file")
    s.add_argument("--model", default="synthetic-full", choices=["synthetic-full", "tiny"])
    s.add_argument("--layers", help="D,S: the full width with D double and S single blocks (a CPU-sized model)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--fp8", default="off", choices=["off", "row", "tensor", "none"],
                   help="store the block linears in fp8 e4m3 with per-row, per-tensor or no scales")
    s.add_argument("--out", required=True)
    for name in ("measure", "measure-here"):
        m = sub.add_parser(name, help="measure loading a single file (measure-here: in this process)")
        m.add_argument("--transformer", required=True)
        m.add_argument("--device", default="cpu")
        m.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                       help="the transformer alone is loaded in this dtype (the pipeline loads use the server's)")
        m.add_argument("--model", help="also load the rest of the pipeline from this --model (load_model)")
        m.add_argument("--optimizations", help="load a FluxService with these optimisations and report /health")
        m.add_argument("--baseline", action="store_true",
                       help="also measure diffusers' FluxTransformer2DModel.from_single_file(path)")
        m.add_argument("--loader", default="server", choices=["server", "diffusers"], help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    result = {"save": cmd_save, "measure": cmd_measure, "measure-here": measure_here}[a.cmd](a)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
