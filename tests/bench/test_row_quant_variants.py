"""bench/bench_row_quant.py's layouts compute what the kernels in use compute (Triton's CPU interpreter, set up by
conftest), its "in use" label names the kernel the model's ops launch, and bench/probe_fp8_gemm_step.py's GEMM list
is the step's: the GPU figures in BENCHMARKS.md compare like with like only if all hold."""
import pytest
import torch

import bench_row_quant as rq
import probe_fp8_gemm_step as probe
from optimizations.fp8 import gelu_quant as fp8_gelu_quant
from optimizations.fp8 import norm_quant as fp8_norm_quant


def _bits(q):
    return q.view(torch.uint8)


def _labelled_once(names, label):
    return sum(label in n for n in names) == 1


def test_gelu_layouts_match_the_kernel_in_use_bit_for_bit():
    torch.manual_seed(0)
    m, k = 3, rq.GELU_K
    x = torch.randn(m, k, dtype=torch.bfloat16) * 3
    x[1] = 0  # an all-zero row: the scale floor
    q, s = torch.empty(m, k, dtype=torch.float8_e4m3fn), torch.empty(m, 1)
    variants = rq.gelu_variants(m, k, [x], [q], [s])
    names = list(variants)
    assert rq.IN_USE in names[0] and _labelled_once(names, rq.IN_USE) and _labelled_once(names, rq.BEFORE)
    assert "3 x 4096 chunks, 8 warps" in names[0] and "padded to 16384 lanes, 16 warps" in \
        next(n for n in names if rq.BEFORE in n)
    op_q, op_s = fp8_gelu_quant._op()(x)  # what the model runs
    for name, launch in variants.items():
        q.zero_(), s.zero_()
        launch(0)
        assert torch.equal(_bits(q), _bits(op_q)), name
        assert torch.equal(s, op_s), name


@pytest.mark.parametrize("case", sorted(rq.NORM_CASES))
def test_norm_layouts_match_the_kernel_in_use(case):
    torch.manual_seed(0)
    inputs, rows, _ = rq.norm_case_inputs(case, m=3, n=1, text=2, device="cpu")
    mod = torch.randn(1, 6 * rq.NORM_K, dtype=torch.bfloat16) * 0.1
    outs = [None]
    variants = rq.norm_variants(inputs, mod, rq.NORM_CASES[case], outs)
    names = list(variants)
    assert rq.IN_USE in names[0] and _labelled_once(names, rq.IN_USE) and _labelled_once(names, rq.BEFORE)
    assert "3 x 1024 chunks, 2 warps" in names[0] and "padded, 1 row x 4 warps" in \
        next(n for n in names if rq.BEFORE in n)
    fp8_norm_quant._ops()
    want = torch.ops.flux_kontext.norm_modulate_quant(*inputs(0), mod, *rq.NORM_CASES[case], 1e-6)  # the model's
    assert want[0].shape == (1, rows, rq.NORM_K) and (want[2].numel() > 0) == (case == "residual")
    for name, launch in variants.items():
        launch(0)
        # fp32 sums in another order: at most a rare one-step difference, within the tool's own tolerance
        agreement = rq.norm_agreement(outs[0], want)
        assert agreement["matches"], (name, agreement)
        if rq.IN_USE in name:  # the op's own kernel and launch: the same bits
            assert agreement["q_mismatch_frac"] == 0 and agreement["scale_max_rel"] == 0, name
    # and the tool's check tells a wrong result: shift and scale swapped
    shift, scale, gate = rq.NORM_CASES[case]
    wrong = torch.ops.flux_kontext.norm_modulate_quant(*inputs(0), mod, scale, shift, gate, 1e-6)
    assert not rq.norm_agreement(wrong, want)["matches"]


def test_probe_runs_the_steps_266_gemms():
    """19 double blocks x 2 streams x 4 linears + 38 single blocks x 3 (the fused input projection and proj_out's
    two halves): the count of _scaled_mm calls per step in the model's profile."""
    for image in probe.IMAGE_TOKENS.values():
        gemms = probe.step_gemms(image)
        assert sum(c for *_, c in gemms) == 266
        assert (image + probe.TEXT, probe.D, 3 * probe.D + probe.MLP, probe.SINGLE) in gemms


def test_kernel_tools_take_their_row_counts_from_the_workloads():
    """Image tokens per workload (output + reference image, 16x16-pixel patches): the row counts the tools time."""
    import bench_norm_quant
    import bench_qk_norm_rope

    from kontext_server.benchmark import floor

    assert floor.IMAGE_TOKENS == {"edit-1024": 8192, "t2i-1024": 4096, "edit-512": 2048}
    for tokens in (rq.TOKENS, probe.IMAGE_TOKENS, bench_norm_quant.IMAGE_TOKENS, bench_qk_norm_rope.IMAGE_TOKENS):
        assert dict(tokens) == floor.IMAGE_TOKENS
