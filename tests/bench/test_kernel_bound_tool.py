"""bench/probe_kernel_bound.py: its kernel list is one FLUX step, the FLOPs the floor model (docs/design.md) counts.

The GPU run itself needs CUDA (BENCHMARKS.md "kernel bound"); on CPU the list and the floor are checked against the
full-size architecture built on the meta device, so a change to either the model's floor or the tool's shapes fails.
"""
import pytest
import torch

from kontext_server.benchmark import floor
from kontext_server.models import config, synthetic
import probe_kernel_bound  # bench/ (pytest.ini's pythonpath)


@pytest.fixture(scope="module")
def full_transformer():
    from diffusers import FluxTransformer2DModel

    with synthetic.building_on("meta", torch.bfloat16):
        return FluxTransformer2DModel(**config.full_configs()["transformer"])


@pytest.mark.parametrize("workload", ["edit-512", "t2i-1024", "edit-1024"])
@pytest.mark.parametrize("fp8", [False, True])
def test_the_kernel_list_has_the_floor_models_flops(full_transformer, workload, fp8):
    ops = probe_kernel_bound.block_ops(floor.IMAGE_TOKENS[workload])
    seq = floor.IMAGE_TOKENS[workload] + probe_kernel_bound.TEXT
    bound = probe_kernel_bound.floor_ms(ops, fp8)
    assert bound["total_ms"] == pytest.approx(floor.floor_ms_per_step(full_transformer, seq, fp8), abs=0.01)
    cfg = full_transformer.config
    attention = [o for o in ops if o[0] == "attention"]
    assert len(attention) == cfg.num_layers + cfg.num_single_layers == 57
    assert {o[1] for o in attention} == {seq}  # joint attention over text + image (+ reference) tokens
    # the step's GEMM count as the profiles show it (19 x 8 + 38 x 3; BENCHMARKS.md "cuBLASLt workspace")
    assert sum(1 for o in ops if o[0] == "gemm") == 266


def test_without_cuda_it_says_why_and_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert probe_kernel_bound.main(["--workload", "edit-512"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["kernel_bound-1.json", "kernel_bound-fp8-1.json"])
def test_the_summary_reproduces_the_committed_h100_results(name):
    """summarise() and to_markdown() rebuild BENCHMARKS.md's figures from the phases the H100 run recorded."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "2026-11-24-h100-bound" / name
    recorded = json.loads(path.read_text())["results"]
    rebuilt = [probe_kernel_bound.summarise(r["workload"], probe_kernel_bound.block_ops(
        floor.IMAGE_TOKENS[r["workload"]]), r["dtype"] == "fp8", r["phases"]) for r in recorded]
    for old, new in zip(recorded, rebuilt):
        for key in ("seq_len", "kernels", "floor", "target_1_15x_ms", "sustained_mean_over_floor",
                    "first_call_over_floor"):
            assert new[key] == old[key], key
    table = probe_kernel_bound.to_markdown(rebuilt).splitlines()
    assert len(table) == 2 + len(recorded)
    if name == "kernel_bound-1.json":  # BENCHMARKS.md, "kernel bound": t2i-1024 on machine A
        t2i = next(line for line in table if line.startswith("| t2i-1024 "))
        assert "| 98.2 | 112.9 | 104.95 |" in t2i and "| 114.64 |" in t2i and "| 1.168 |" in t2i
        assert t2i.endswith("| 1425 | 697 |")


def test_the_kernel_list_has_the_gemms_of_the_fp8_gemm_probe():
    """Two views of one step's GEMMs: block_ops in block order (this tool), step_gemms grouped by shape with counts
    (bench/probe_fp8_gemm_step.py). They must list the same GEMMs, or the two tools time different steps."""
    from collections import Counter

    import probe_fp8_gemm_step

    for image in floor.IMAGE_TOKENS.values():
        ours = Counter(tuple(dims) for kind, *dims in probe_kernel_bound.block_ops(image) if kind == "gemm")
        theirs = Counter()
        for m, k, n, count in probe_fp8_gemm_step.step_gemms(image):
            theirs[(m, k, n)] += count
        assert ours == theirs
