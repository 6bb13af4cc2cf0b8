"""bench/bench_lora_branches.py: every way of running an adapter computes the same layer (the GPU run times them)."""
from __future__ import annotations

import torch

import bench_lora_branches as tool  # bench/ (pytest.ini's pythonpath)


def test_each_lora_branch_gives_the_base_gemm_plus_the_adapters_update():
    errors = tool.errors(tool.Gemm(64, 96, 288, 8, "cpu", fp8=False))
    for name in ("side", "rows", "kext"):
        assert errors[name]["output"] < 0.01, (name, errors[name])  # bf16 rounding of an fp32 reference
    assert errors["kext-base"]["equals_base"]  # the wide storage's views give the base GEMM, bit for bit


def test_a_fused_gemm_carries_one_adapter_per_projection_it_fuses():
    shapes = {(k, n) for kind, _, k, n in (op for op in tool.block_ops(2048) if op[0] == "gemm")}
    assert {s: tool.projections(*s) for s in shapes} == {(3072, 9216): 3, (3072, 21504): 4, (3072, 3072): 1,
                                                         (3072, 12288): 1, (12288, 3072): 1}


def test_the_wide_weights_first_columns_are_the_base_weight():
    g = tool.Gemm(16, 32, 48, 4, "cpu", fp8=False)
    assert torch.equal(g.wide[:, :32], g.w_plain) and torch.equal(g.wide[:, 32:], g.b_plain)


def test_a_merge_writes_the_fp8_rows_of_the_weight_plus_the_update_and_a_restore_those_of_the_weight():
    g = tool.Gemm(16, 32, 48, 4, "cpu", fp8=True)
    g.fp8_merge()
    merged = g.mq.float() * g.ms
    target = (g.w_plain.float() + g.b_plain.float() @ g.a.float())
    assert ((merged - target).norm() / target.norm()).item() < 0.05  # e4m3 rounding of each row
    g.fp8_restore()
    assert torch.equal(g.mq, g.wq) and torch.equal(g.ms, g.sw)  # the copy's own rows again, bit for bit
