"""Which optimisations compose with context parallelism, declared through each one's `available(device)` (the
planner and /health then say why one does not run): on a CUDA device split over 2 ranks, CUDA graphs are refused
with the reason, attention never picks FA3 (it bypasses the SDPA that the split attention intercepts), and every
other entry stays available. The CPU-runnable ones are checked for equal output in test_context_parallel.py."""
from __future__ import annotations

from optimizations import attention
from optimizations.base import DeviceInfo
from optimizations.registry import build_registry
from kontext_server.service.planner import plan

H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
H100_SPLIT = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), context_parallel=2)
COMPOSES = {"compile", "qkv_fusion", "channels_last", "modulation_table", "first_block_cache", "attention",
            "low_precision", "dpm_solver"}
REFUSED = {"cuda_graphs"}


def test_every_optimisation_either_composes_with_context_parallelism_or_says_why():
    registry = build_registry()
    assert set(registry) == COMPOSES | REFUSED  # a new entry must be placed in one of the two sets
    for name, opt in registry.items():
        assert opt.available(H100) is None
        reason = opt.available(H100_SPLIT)
        if name in REFUSED:
            assert reason and "context parallelism" in reason
        else:
            assert reason is None, (name, reason)


def test_a_request_for_cuda_graphs_under_context_parallelism_reports_why_it_did_not_run():
    registry = build_registry()
    decisions = plan({"cuda_graphs": True}, registry, {"dpm_solver": "prepared"}, H100_SPLIT)
    assert decisions["cuda_graphs"].requested and not decisions["cuda_graphs"].applied
    assert "context parallelism" in decisions["cuda_graphs"].detail


def test_attention_takes_cudnn_not_fa3_when_the_sequence_is_split(monkeypatch):
    monkeypatch.setattr(attention, "_importable", lambda mod: mod == "flash_attn_interface")
    assert attention.best_backend(H100)[0] == "_flash_3"
    backend, detail = attention.best_backend(H100_SPLIT)
    assert backend == "_native_cudnn" and "context parallelism" in detail
