"""bench/row_quant_padded.py: the row-quantisation layouts before the chunked ones compute what the kernels in use
compute (Triton's CPU interpreter), so bench/bench_row_quant.py compares like with like."""
from __future__ import annotations

import pytest
import torch

import row_quant_padded as padded  # bench/ (pytest.ini's pythonpath)
from optimizations.fp8 import norm_quant as fp8_norm_quant
from tests.optimizations.test_fp8_norm_quant import VARIANTS, _call, _inputs, assert_fp8_matches


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_padded_norm_kernel_matches_its_reference(variant):
    """The layout before (kept for the benchmark tools), 2 rows per program over an odd row count, masked K."""
    t = _inputs(k=40, strided=True)
    kernel = padded.norm_modulate_quant_padded_kernel
    launch = lambda *a: padded.launch_norm_modulate_quant_padded(kernel, *a, rows=2)  # noqa: E731
    q, s, h = _call(launch, t, variant)
    rq, rs, rh = _call(fp8_norm_quant.norm_modulate_quant_reference, t, variant)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    assert_fp8_matches(q, rq)
    if variant == "residual":
        torch.testing.assert_close(h, rh, rtol=1e-6, atol=1e-6)


def test_the_padded_launcher_checks_its_inputs_as_the_chunked_one_does():
    t = _inputs()
    with pytest.raises(ValueError, match="chunks"):
        padded.launch_norm_modulate_quant_padded(None, t["x"], None, None, t["mod"], 3, 6, -1, 1e-6)


@pytest.mark.parametrize("k", [12288, 1000, 40])
def test_gelu_quant_op_matches_the_padded_kernel_bit_for_bit(k):
    """The op (the chunked kernel, in Triton's CPU interpreter) against the padded kernel it replaced: 12,288 =
    3 x 4,096 without masks, 1,000 = 2 x 512 and 40 = 3 x 16 with the last piece masked; one row all zeros."""
    from optimizations.fp8.gelu_quant import _op
    from optimizations.fp8.norm_quant import _next_power_of_2

    torch.manual_seed(0)
    m = 3
    x = torch.randn(m, k, dtype=torch.bfloat16) * 3
    x[1] = 0  # the scale floor; zeros out
    x[0, -1] = x[2, k // 2] = 40  # the row amax in the last lane (in the masked piece when K is uneven), the middle
    q, s = _op()(x)
    pq, ps = torch.empty(m, k, dtype=torch.float8_e4m3fn), torch.empty(m, 1)
    padded._gelu_quant_rows_kernel()[(m,)](x, pq, ps, k, k, k, BLOCK=_next_power_of_2(k))
    assert q.shape == (m, k) and q.dtype == torch.float8_e4m3fn and s.shape == (m, 1)
    assert torch.equal(q.view(torch.uint8), pq.view(torch.uint8)) and torch.equal(s, ps)
    assert (q[1].float() == 0).all() and float(s[1]) == pytest.approx(1e-12 / 448)
    assert (q[[0, 2]].float().abs().amax(1) == 448.0).all()  # each row's amax maps to the largest fp8 value
