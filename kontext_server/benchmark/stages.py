"""The stage table: stage 0 (naive) -> 5 (CUDA graphs), preparing optimisations stage by stage on one loaded model,
for `flux_kontext_optimized.py benchmark --workload W`. Each row: per-stage medians, speed-up against stage 0 and
the previous stage, the ratio of the step to the floor model, and fidelity against stage 0 with the same seed.
Side rows (1c, 5c: a main row + the first-block cache at its scheduler's default threshold) also report their
fidelity against their main row, the uncached output with the same seed (`--stages 5,5c`: the cache in the fast
tier, what it skips and what it costs).
With `--context-parallel N` every row runs split over N ranks and again on rank 0 alone (the same loaded model, the
sequence not split): its `scaling` is the one-GPU time over the split time, per step and end to end."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kontext_server.benchmark.fidelity import StepProbe
from kontext_server.benchmark.floor import WORKLOADS, floor_ms_per_step, seq_len_for
from kontext_server.benchmark.timing import finish_rows, sampling_clocks, test_image, time_request
from kontext_server.request import FLAG_TO_OPTIMIZATION, InferenceRequest
from kontext_server.settings import code_switches
from optimizations.base import EXACT


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
        Stage("1c", "stage 1 lossless + first-block cache at the Euler default 0.12 (eager: skips blocks per step)",
              ["first_block_cache"], dict(use_first_block_cache=True, use_mxfp4=False, use_dpm_solver=False)),
        Stage("2", "+ FA3-class attention (cuDNN) + fused q/k norm + RoPE", ["attention"],
              dict(lossless, use_flash_attention=True, use_mxfp4=False, use_dpm_solver=False, use_cuda_graphs=False)),
        Stage("3", "+ fp8 GEMMs (MXFP4 flag)", ["low_precision"],
              dict(lossless, use_flash_attention=True, use_mxfp4=True, use_dpm_solver=False, use_cuda_graphs=False)),
        Stage("4", "+ DPM-Solver++ 2M, 14 steps", ["dpm_solver"],
              dict(lossless, use_flash_attention=True, use_mxfp4=True, use_dpm_solver=True, use_cuda_graphs=False)),
        Stage("5", "+ CUDA graphs", ["cuda_graphs"],
              dict(lossless, use_flash_attention=True, use_mxfp4=True, use_dpm_solver=True, use_cuda_graphs=True)),
        Stage("5c", "stage 5 + first-block cache at the DPM-Solver++ default 0.24 (graphs: first block, then the "
                    "rest or the skip)", [],
              dict(lossless, use_flash_attention=True, use_mxfp4=True, use_dpm_solver=True, use_cuda_graphs=True,
                   use_first_block_cache=True)),
    ]


class _RankZeroAlone:
    """A context-parallel service seen as rank 0 alone (the sequence not split): what `time_request` times for the
    one-GPU side of the scaling column."""

    def __init__(self, service):
        self.device_info, self.generate = service.device_info, service.generate_alone


def _scaling(split: dict, alone: dict, degree: int) -> dict:
    """The split row against rank 0 alone: speed-ups per step and end to end, and per-step efficiency (1.0: linear)."""
    s, a = split["timings_ms"], alone["timings_ms"]
    step = a["transformer_per_step"] / s["transformer_per_step"] if s["transformer_per_step"] else None
    return {"one_gpu_ms": {"transformer_per_step": a["transformer_per_step"], "total": a["total"]},
            "step": round(step, 2) if step else None, "total": round(a["total"] / s["total"], 2),
            "efficiency": round(step / degree, 2) if step else None}


def run_stage_benchmark(service, workload: str, runs: int = 5, steps: int = 28, progress=None,
                        stages: list[str] | None = None) -> dict:
    width, height, edit = WORKLOADS[workload]
    probe = StepProbe()
    image = test_image(width, height) if edit else None
    L = seq_len_for(width, height, edit)
    transformer = service.transformer_variants[EXACT]
    rows = []
    cumulative: list[str] = []
    degree = service.config.context_parallel if hasattr(service, "generate_alone") else 1
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
            if degree > 1:  # the same stage on rank 0 alone: the scaling column
                alone = time_request(_RankZeroAlone(service), req, image, runs, sampler=sampler)
                row["scaling"] = _scaling(row, alone, degree)
            row["prepare_ms"] = round(prepare_ms, 1)
            row["step_rel_error_vs_stage0"] = probe.rel_error(service.transformer_for(service.plan(req)))
            fp8 = "low_precision" in row["applied"]
            if service.device_info.is_cuda:
                floor = floor_ms_per_step(transformer, L, fp8)
                row["floor_ms_per_step"] = round(floor, 1)
                row["floor_ratio"] = round(row["timings_ms"]["transformer_per_step"] / floor, 2)
            rows.append(row)
    finish_rows(rows)
    return {"workload": workload, "width": width, "height": height, "edit": edit, "seq_len": L,
            "model": service.model.source, "synthetic": service.model.synthetic, "device": service.device_info.name,
            "torch": torch.__version__, "code_switches": code_switches(), "runs": runs,
            "clock_fields": sampler.fields if sampler is not None else None,
            "compiled_regions": service.registry["compile"].aot_stats.as_dict(),
            "context_parallel": service.parallel_report() if degree > 1 else None, "rows": rows}
