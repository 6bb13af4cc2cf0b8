"""optimizations/kernels/fp8_weight_quant.py (on CPU in Triton's interpreter, with the GPU's cast rounding: see
tests/conftest.py): the one-pass weight quantisation gives exactly the bytes and scales of the two functions it stands
in for, torchao's row-wise float8 (the GPU's fp8 copy) and quantize_rows, on rows of the model's widths and an odd
one, with outliers; and where those two functions disagree, it follows the one it is asked for."""
from __future__ import annotations

import pytest
import torch

from kontext_server.lora.fp8_merge import QUANTISERS, _matches
from optimizations.fp8.linear import Fp8Linear

SHAPES = [(48, 3072), (8, 1000), (4, 12288)]


def weight(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.02
    w[0, 5], w[-1, -1] = 1.7, -0.9  # rows whose amax is an outlier
    return w.to(torch.bfloat16)


def same(a, b) -> bool:
    return torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and \
        torch.equal(a[1].reshape(-1).float(), b[1].reshape(-1).float())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("reference", ["torchao", "quantize_rows"])
def test_the_weight_kernel_gives_the_reference_quantisation_bit_for_bit(shape, reference):
    from optimizations.kernels.fp8_weight_quant import quantize_weight_rows

    w = weight(shape)
    assert same(quantize_weight_rows(w, scale_in_weight_dtype=reference == "torchao"), QUANTISERS[reference](w))


def test_where_torchao_and_quantize_rows_disagree_the_kernel_follows_the_one_asked_for():
    from optimizations.kernels.fp8_weight_quant import quantize_weight_rows

    w = weight((48, 3072), seed=1)
    torchao, ours = QUANTISERS["torchao"](w), QUANTISERS["quantize_rows"](w)
    assert not same(torchao, ours)  # torchao rounds the scale to bf16 and divides; quantize_rows multiplies
    assert same(quantize_weight_rows(w, True), torchao) and not same(quantize_weight_rows(w, True), ours)
    assert same(quantize_weight_rows(w, False), ours)


def test_the_merge_recognises_a_torchao_copy_with_the_kernel():
    w = weight((32, 3072), seed=2)
    q, s = QUANTISERS["torchao"](w)
    linear = Fp8Linear(q, s, None, out_dtype=torch.bfloat16)
    assert _matches(linear, w, QUANTISERS["triton_torchao"])
    assert not _matches(linear, w, QUANTISERS["triton_rows"])


def test_the_merge_writes_with_the_kernel_straight_into_the_linears_storage():
    from types import SimpleNamespace

    from kontext_server.lora.fp8_merge import Fp8Merge, Target

    w = weight((32, 1024), seed=3)
    q, s = QUANTISERS["torchao"](w)
    linear = Fp8Linear(q, s, None, out_dtype=torch.bfloat16)
    rows, scale = linear.weight_t.t(), linear.weight_scale
    pristine = rows.view(torch.uint8).clone(), scale.clone()
    slot = SimpleNamespace(name="m", rows=16, A=torch.randn(48, 1024).to(torch.bfloat16) * 0.05,
                           B=torch.randn(32, 48).to(torch.bfloat16) * 0.05)
    merge = Fp8Merge([Target("m", linear, w, slot, slice(None), "triton_torchao")], {})
    assert merge.apply("x", 1)
    expected = QUANTISERS["torchao"](torch.addmm(w, slot.B[:, :16], slot.A[:16]))
    assert linear.weight_t.t().data_ptr() == rows.data_ptr() and same((rows, scale), expected)
    assert merge.restore() and torch.equal(rows.view(torch.uint8), pristine[0]) and torch.equal(scale, pristine[1])
