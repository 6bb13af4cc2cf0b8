"""The built-in benchmark: the same FluxService and registry as serving, timed per stage.

Two entry points:
- `run_request_benchmark`: compares what the running server has prepared (all flags off vs the default request
  vs everything prepared), used by GET /benchmark and by `python flux_kontext_optimized.py` with no arguments.
- `run_stage_benchmark`: the seed's stage table (stage 0 naive -> 5 CUDA graphs), preparing optimisations
  stage by stage on one loaded model, for `python flux_kontext_optimized.py benchmark --workload W`.

Protocol (DESIGN.md section 4): warm-up first (compile / capture reported separately as cold start), median of
`runs` timed runs with spread, ratios inside one run, fidelity against stage 0 with the same seed.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from gpu_clocks import ClockSampler
from optimizations.compile_cache import code_switches
from schemas import FLAG_TO_OPTIMIZATION, InferenceRequest

STAGE_KEYS = ("text_encode", "image_encode", "transformer", "transformer_per_step", "vae_decode", "glue", "total")

# Floor model (DESIGN.md): measured ceilings on H100/H200.
BF16_MATMUL_TFLOPS = 790e12
FP8_MATMUL_TFLOPS = 1150e12
ATTENTION_TFLOPS = 650e12

WORKLOADS = {  # name -> (width, height, edit)
    "edit-1024": (1024, 1024, True),
    "t2i-1024": (1024, 1024, False),
    "edit-512": (512, 512, True),
}


@dataclass
class Stage:
    name: str
    label: str
    prepare: list  # optimisations to prepare before this stage (added to the previous stages')
    flags: dict  # request flags
    steps: int | None = None


def stage_plan() -> list[Stage]:
    lossless = dict(use_compile=True, use_qkv_fusion=True, use_channels_last=True, use_modulation_table=True)
    return [
        Stage("0", "naive bf16 (eager, Euler)", [], {f: False for f in FLAG_TO_OPTIMIZATION}),
        Stage("1", "+ compile, QKV fusion, channels-last, modulation table",
              ["qkv_fusion", "channels_last", "modulation_table", "compile"],
              dict(lossless, use_first_block_cache=False, use_flash_attention=False, use_mxfp4=False,
                   use_dpm_solver=False, use_cuda_graphs=False)),
        Stage("1c", "stage 1 lossless + first-block cache 0.12 (eager: cache skips blocks per step)",
              ["first_block_cache"], dict(use_first_block_cache=True, use_mxfp4=False, use_dpm_solver=False)),
        Stage("2", "+ FA3-class attention (cuDNN) + fused q/k norm + RoPE", ["attention"],
              dict(lossless, use_flash_attention=True, use_mxfp4=False, use_dpm_solver=False, use_cuda_graphs=False)),
        Stage("3", "+ fp8 GEMMs (MXFP4 flag)", ["low_precision"],
              dict(lossless, use_flash_attention=True, use_mxfp4=True, use_dpm_solver=False, use_cuda_graphs=False)),
        Stage("4", "+ DPM-Solver++ 2M, 14 steps", ["dpm_solver"],
              dict(lossless, use_flash_attention=True, use_mxfp4=True, use_dpm_solver=True, use_cuda_graphs=False)),
        Stage("5", "+ CUDA graphs", ["cuda_graphs"],
              dict(lossless, use_flash_attention=True, use_mxfp4=True, use_dpm_solver=True, use_cuda_graphs=True)),
    ]


# Linears a token does not go through: AdaLN modulation and the timestep/guidance embedders act on one vector,
# the fused copies duplicate q/k/v, and in the double blocks each token takes one stream only (image tokens the
# image-stream linears, text tokens the context-stream ones), so the context stream is not counted again.
_NOT_PER_TOKEN = ("norm", "time_text_embed", "to_qkv", "to_added_qkv", "add_q_proj", "add_k_proj", "add_v_proj",
                  "to_add_out", "ff_context", "context_embedder")


def linear_token_params(transformer) -> int:
    """Parameters of the linear layers each token passes through once per step (~6.45 B for FLUX), the same
    before and after QKV fusion (a fused to_qkv counts where its freed to_q/to_k/to_v did)."""
    names = {name for name, _ in transformer.named_modules()}
    total = 0
    for name, m in transformer.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        if name.endswith(".to_qkv") and name[: -len("to_qkv")] + "to_q" not in names:
            total += m.weight.numel()
        elif not any(s in name for s in _NOT_PER_TOKEN):
            total += m.weight.numel()
    return total


def floor_ms_per_step(transformer, seq_len: int, fp8: bool) -> float:
    cfg = transformer.config
    n_blocks = cfg.num_layers + cfg.num_single_layers
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    lin = 2 * linear_token_params(transformer) * seq_len / (FP8_MATMUL_TFLOPS if fp8 else BF16_MATMUL_TFLOPS)
    attn = n_blocks * 4 * seq_len**2 * inner / ATTENTION_TFLOPS
    return (lin + attn) * 1000


def seq_len_for(width: int, height: int, edit: bool, text_tokens: int = 512) -> int:
    img = (width // 16) * (height // 16)
    return img * (2 if edit else 1) + text_tokens


# image tokens (output + reference image) per workload: the row counts the kernel benchmark tools use
IMAGE_TOKENS = {name: seq_len_for(w, h, edit, text_tokens=0) for name, (w, h, edit) in WORKLOADS.items()}


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB for images in [0, 1]; None when identical (infinite PSNR is not valid JSON)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else round(10 * math.log10(1.0 / mse), 2)


def fidelity(ref, out) -> dict:
    if ref is None:
        return {}
    img_a, img_b = np.asarray(ref.images[0]), np.asarray(out.images[0])
    value = psnr(img_a, img_b)
    fid = {"identical_image": True} if value is None else {"psnr_db": value}
    if ref.latents is not None and out.latents is not None:
        la, lb = ref.latents.float(), out.latents.float()
        fid["max_abs_latent_diff"] = round(float((la - lb).abs().max()), 5)
        fid["rel_latent_error"] = round(float((la - lb).norm() / la.norm().clamp_min(1e-12)), 5)
    return fid


def _test_image(width: int, height: int) -> Image.Image:
    """A deterministic, structured input image (gradients + shapes), not constant: encoders see real content."""
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    arr = np.concatenate([x * np.ones_like(y), y * np.ones_like(x), (x * y) ** 0.5], axis=2)
    return Image.fromarray((arr * 255).astype(np.uint8))


def time_request(service, req: InferenceRequest, image, runs: int, should_stop=None,
                 sampler: ClockSampler | None = None) -> dict:
    """Warm-up (reported), then `runs` timed runs: medians and spread per stage, and with a sampler the GPU's
    clocks and power during the timed runs."""
    cuda = service.device_info.is_cuda
    t0 = time.perf_counter()
    warm = service.generate(req, image, should_stop=should_stop, output_type="np")
    warm_ms = (time.perf_counter() - t0) * 1000
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    results = []
    t_runs = time.monotonic()
    for _ in range(runs):
        if should_stop and (err := should_stop()):
            raise err
        results.append(service.generate(req, image, should_stop=should_stop, output_type="np"))
    clocks = sampler.window(t_runs, time.monotonic()) if sampler is not None else None
    med = {k: statistics.median(r.timings_ms.get(k, 0.0) for r in results) for k in STAGE_KEYS}
    totals = [r.timings_ms["total"] for r in results]
    return {
        "timings_ms": {k: round(v, 2) for k, v in med.items()},
        "total_min_ms": round(min(totals), 2), "total_max_ms": round(max(totals), 2),
        "cold_start_ms": round(warm.timings_ms.get("cold_start", 0.0), 1),  # compile / capture, not the timed runs
        "first_run_ms": round(warm_ms, 1),
        "steps": results[-1].steps, "steps_computed": results[-1].steps_computed,
        "steps_skipped": results[-1].steps_skipped,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "applied": [k for k, d in results[-1].optimizations.items() if d.applied],
        "not_applied": {k: d.detail for k, d in results[-1].optimizations.items() if d.requested and not d.applied},
        "gpu_clocks": clocks,
        "_result": results[-1],
    }


def _finish_rows(rows: list[dict], ref_key: str = "0") -> None:
    base = next((r for r in rows if r["stage"] == ref_key), rows[0])
    prev = None
    for row in rows:
        row["speedup_vs_stage0"] = round(base["timings_ms"]["total"] / row["timings_ms"]["total"], 2)
        if prev is not None:
            row["speedup_vs_previous"] = round(prev["timings_ms"]["total"] / row["timings_ms"]["total"], 2)
        row["fidelity_vs_stage0"] = fidelity(base["_result"], row["_result"]) if row is not base else {}
        if not row["stage"].endswith("c"):  # side rows (cache variant) are not "the previous stage"
            prev = row
    for row in rows:
        row.pop("_result", None)


def clock_sampler(service) -> ClockSampler | None:
    """A started sampler of the service's GPU, None on CPU. An H100 at its power cap clocks down under sustained fp8
    work (BENCHMARKS.md, "power cap"): each benchmark row says what clocks its timed runs had."""
    if not service.device_info.is_cuda:
        return None
    return ClockSampler(sample_ms=100, device_index=torch.device(service.device).index or 0).start()


@contextlib.contextmanager
def sampling_clocks(service):
    """clock_sampler's sampler (or None) for the duration of a benchmark; its nvidia-smi child stopped after."""
    sampler = clock_sampler(service)
    try:
        yield sampler
    finally:
        if sampler is not None:
            sampler.stop()


def run_request_benchmark(service, runs: int = 3, steps: int = 4, width: int = 256, height: int = 256,
                          edit: bool = False, should_stop=None, progress=None) -> dict:
    """Unoptimised vs the server's default vs everything it prepared, on the loaded model."""
    image = _test_image(width, height) if edit else None
    base = dict(prompt="a red car on a mountain road, photo", width=width, height=height, steps=steps, seed=1234)
    variants = [("0", "all request flags off (load-time optimisations stay on)", {f: False for f in FLAG_TO_OPTIMIZATION}),
                ("default", "server default (lossless prepared optimisations)", {}),
                ("all", "everything prepared (incl. lossy: fp8, DPM-Solver++, step cache)",
                 {f: True for f in FLAG_TO_OPTIMIZATION})]
    rows = []
    with sampling_clocks(service) as sampler:
        for key, label, flags in variants:
            if progress:
                progress(label)
            req = InferenceRequest(**base, **flags)
            if key == "all" and req.use_dpm_solver and "dpm_solver" in service.prepared:
                req = req.model_copy(update={"steps": max(1, steps // 2)})  # the solver's point: half the steps
            row = {"stage": key, "label": label, **time_request(service, req, image, runs, should_stop, sampler)}
            rows.append(row)
    _finish_rows(rows)
    return {"model": service.model.source, "synthetic": service.model.synthetic,
            "device": service.device_info.name, "workload": {"width": width, "height": height, "edit": edit,
                                                              "steps": steps, "runs": runs},
            "torch": torch.__version__, "code_switches": code_switches(), "rows": rows}


class StepProbe:
    """Per-step fidelity: the real inputs of one mid-denoising transformer call of stage 0, and stage 0's output
    on them. Each later stage runs its own transformer on the same inputs: the relative error of one step,
    free of the drift that 28 steps of a random-weight model amplify."""

    def __init__(self, call_index: int = 3):
        self.call_index, self.calls, self.inputs, self.ref = call_index, 0, None, None

    def observe(self, kwargs):
        if self.calls == self.call_index and self.inputs is None:
            self.inputs = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        self.calls += 1

    def rel_error(self, module) -> float | None:
        if self.inputs is None:
            return None
        with torch.inference_mode():
            out = module(**self.inputs)[0].float()
        if self.ref is None:
            self.ref = out
            return 0.0
        return round(float((out - self.ref).norm() / self.ref.norm()), 5)


def run_stage_benchmark(service, workload: str, runs: int = 5, steps: int = 28, progress=None,
                        stages: list[str] | None = None) -> dict:
    width, height, edit = WORKLOADS[workload]
    probe = StepProbe()
    image = _test_image(width, height) if edit else None
    L = seq_len_for(width, height, edit)
    transformer = service.transformer_variants["bf16"]
    rows = []
    cumulative: list[str] = []
    with sampling_clocks(service) as sampler:
        for stage in stage_plan():
            cumulative += stage.prepare  # a stage includes everything the stages before it prepared
            if stages is not None and stage.name not in stages:
                continue
            if progress:
                progress(f"stage {stage.name}: {stage.label}")
            t0 = time.perf_counter()
            todo = [n for n in cumulative if n not in service.prepared
                    and service.registry[n].available(service.device_info) is None]
            service.prepare(todo)
            prepare_ms = (time.perf_counter() - t0) * 1000
            flags = dict(stage.flags)
            req = InferenceRequest(prompt="make the car red, photo", width=width, height=height,
                                   steps=None if flags.get("use_dpm_solver") else steps, seed=1234, **flags)
            if probe.inputs is None:
                service.transformer_call_observer = probe.observe
            try:
                row = {"stage": stage.name, "label": stage.label,
                       **time_request(service, req, image, runs, sampler=sampler)}
            finally:
                service.transformer_call_observer = None
            row["prepare_ms"] = round(prepare_ms, 1)
            row["step_rel_error_vs_stage0"] = probe.rel_error(service._transformer_for(service.plan(req))[1])
            fp8 = "low_precision" in row["applied"]
            if service.device_info.is_cuda:
                floor = floor_ms_per_step(transformer, L, fp8)
                row["floor_ms_per_step"] = round(floor, 1)
                row["floor_ratio"] = round(row["timings_ms"]["transformer_per_step"] / floor, 2)
            rows.append(row)
    _finish_rows(rows)
    return {"workload": workload, "width": width, "height": height, "edit": edit, "seq_len": L,
            "model": service.model.source, "synthetic": service.model.synthetic, "device": service.device_info.name,
            "torch": torch.__version__, "code_switches": code_switches(), "runs": runs,
            "clock_fields": sampler.fields if sampler is not None else None,
            "compiled_regions": service.registry["compile"].aot_stats.as_dict(), "rows": rows}


def to_markdown(result: dict) -> str:
    head = ("| stage | what | text enc | img enc | transformer (per step) | VAE dec | glue | total (min-max) | "
            "x stage 0 | x prev | steps comp/skip | peak GiB | cold start | floor ratio | SM MHz, W | fidelity vs 0 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        t = r["timings_ms"]
        fid = dict(r.get("fidelity_vs_stage0") or {})
        if r.get("step_rel_error_vs_stage0"):
            fid = {"step_rel_err": r["step_rel_error_vs_stage0"], **fid}
        fid_s = ", ".join(f"{k}={v}" for k, v in fid.items()) or "-"
        lines.append(
            f"| {r['stage']} | {r['label']} | {t['text_encode']:.1f} | {t['image_encode']:.1f} | "
            f"{t['transformer']:.1f} ({t['transformer_per_step']:.1f}) | {t['vae_decode']:.1f} | {t['glue']:.1f} | "
            f"{t['total']:.1f} ({r['total_min_ms']:.0f}-{r['total_max_ms']:.0f}) | {r['speedup_vs_stage0']} | "
            f"{r.get('speedup_vs_previous', '-')} | {r['steps_computed']}/{r['steps_skipped']} | "
            f"{r['peak_memory_gib'] if r['peak_memory_gib'] is not None else '-'} | {r['cold_start_ms']:.0f} ms | "
            f"{r.get('floor_ratio', '-')} | {clocks_cell(r.get('gpu_clocks'))} | {fid_s} |")
    if result.get("code_switches"):  # an A/B run: say so under its table
        lines.append("\nswitches: " + ", ".join(f"{k}={v}" for k, v in result["code_switches"].items()))
    regions = result.get("compiled_regions") or {}
    if regions.get("compiled") or regions.get("loaded") or regions.get("notes"):
        lines.append(f"\nsaved compiled regions: {regions.get('compiled', 0)} compiled, {regions.get('loaded', 0)} "
                     f"loaded, {regions.get('to_dynamo', 0)} left to dynamo"
                     + "".join(f"\n- {n}" for n in regions.get("notes", [])))
    return "\n".join(lines)


def clocks_cell(clocks: dict | None) -> str:
    """The timed runs' median SM clock and power draw, e.g. "1605, 690"; "-" where nothing was sampled."""
    if not clocks or "sm_mhz" not in clocks:
        return "-"
    power = clocks.get("power_w")
    return f"{clocks['sm_mhz']['median']:.0f}, {power['median']:.0f}" if power else f"{clocks['sm_mhz']['median']:.0f}"


def bar_chart(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [r["stage"] for r in rows]
    parts = ["text_encode", "image_encode", "transformer", "vae_decode", "glue"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = np.zeros(len(rows))
    for p in parts:
        vals = np.array([r["timings_ms"][p] for r in rows])
        ax.bar(labels, vals, bottom=bottom, label=p)
        bottom += vals
    ax.set_ylabel("ms (median)")
    ax.set_title(f"{result.get('workload', 'benchmark')} on {result['device']} ({result['model']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
