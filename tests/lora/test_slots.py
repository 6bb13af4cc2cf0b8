"""The slot mechanism on single modules (CPU): what each wrapper adds, for each kind of module the optimised
transformer has (a fused QKV linear, an fp8 linear fed fp8 rows, an fp8 linear fed the pre-GELU activation, a linear
with its GELU applied in the same call, the single blocks' split proj_out), against LoRA computed the plain way; for
the fused branch (the adapter's rows appended under the weight, one GEMM for the base and the down-projection, the
up-projection added in place) and for the side branch."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kontext_server.lora.slots import (LinearRows, LoraGeluOutput, LoraLinear, LoraProjOut, LoraSlot, ScaledRows,
                                       lora_up_add_)
from kontext_server.lora.store import DeviceTarget
from optimizations.fp8.linear import Fp8Linear, Fp8Rows, quantize_rows
from optimizations.fusions.split_proj_out import SplitProjOut

BRANCHES = pytest.mark.parametrize("fuse", [True, False], ids=["fused", "side-branch"])


def target(rank, n_in, n_out, scale, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return DeviceTarget(torch.randn(rank, n_in, generator=g).to(dtype), torch.randn(n_out, rank, generator=g).to(dtype),
                        scale)


def lora(x, t: DeviceTarget, s: float):
    return s * t.scale * F.linear(F.linear(x, t.a), t.b)


def slot(name, parts, n_in, n_out, rank=8, in_split=None, dtype=torch.float32):
    return LoraSlot(name, parts, n_in, n_out, rank, in_split, dtype, "cpu")


@BRANCHES
def test_a_fused_qkv_slot_computes_each_projections_own_update_block_diagonally(fuse):
    torch.manual_seed(0)
    qkv = torch.nn.Linear(16, 3 * 12)
    s = slot("attn.to_qkv", [("to_q", 0, 12), ("to_k", 12, 12), ("to_v", 24, 12)], 16, 36)
    wrapped = LoraLinear(qkv, s, fuse=fuse)
    first = {"to_q": target(4, 16, 12, 2.0, 1), "to_v": target(8, 16, 12, 0.5, 2)}  # no to_k
    second = {"to_k": target(3, 16, 12, 1.0, 3)}
    s.write(0, first, 1.5)
    s.write(1, second, -1.0)
    x = torch.randn(5, 16)
    s.k = 0
    assert torch.equal(wrapped(x), qkv(x))  # k = 0: the base module's output, bit for bit
    s.k = 2
    q, k, v = qkv(x).chunk(3, -1)
    expected = torch.cat([q + lora(x, first["to_q"], 1.5), k + lora(x, second["to_k"], -1.0),
                          v + lora(x, first["to_v"], 1.5)], -1)
    torch.testing.assert_close(wrapped(x), expected, rtol=1e-5, atol=1e-5)
    s.k = 1  # only the first adapter
    torch.testing.assert_close(wrapped(x), torch.cat([q + lora(x, first["to_q"], 1.5), k,
                                                      v + lora(x, first["to_v"], 1.5)], -1), rtol=1e-5, atol=1e-5)


@BRANCHES
def test_a_new_adapter_in_a_slot_leaves_nothing_of_the_old_one(fuse):
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    s = slot("x", [("x", 0, 12)], 16, 12)
    wrapped = LoraLinear(base, s, fuse=fuse)
    s.write(0, {"x": target(8, 16, 12, 1.0, 1)}, 1.0)
    s.write(0, {"x": target(2, 16, 12, 1.0, 2)}, 1.0)  # a smaller rank over a larger one
    s.k = 1
    x = torch.randn(3, 16)
    torch.testing.assert_close(wrapped(x), base(x) + lora(x, target(2, 16, 12, 1.0, 2), 1.0), rtol=1e-5, atol=1e-5)
    s.write(0, {}, 1.0)  # an adapter that does not target this module
    assert torch.equal(wrapped(x), base(x))


def test_the_side_branch_of_an_fp8_linear_fed_fp8_rows_adds_the_update_of_the_dequantised_rows():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 48).to(torch.bfloat16)
    fp8 = Fp8Linear.from_float(lin)
    s = slot("to_out", [("to_out", 0, 48)], 32, 48, dtype=torch.bfloat16)
    t = target(8, 32, 48, 0.5, 1, torch.bfloat16)
    s.write(0, {"to_out": t}, 1.0)
    s.k = 1
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    rows = Fp8Rows(*quantize_rows(x))
    wrapped = LoraLinear(fp8, s, fuse=False)
    dequantised = (rows.data.float() * rows.scale).to(torch.bfloat16)
    assert torch.equal(wrapped(rows) - fp8(rows), (fp8(rows) + s.delta(dequantised)) - fp8(rows))
    # fp8 + adapter against bf16 + adapter: the fp8 tier's error, no more
    exact = lin(x) + lora(x, t, 1.0)
    assert (wrapped(rows).float() - exact.float()).abs().max() / exact.float().abs().max() < 0.05


def test_the_side_branch_of_an_fp8_linear_fed_the_pre_gelu_activation_applies_the_gelu_to_its_input():
    from optimizations.fp8.gelu_quant import GeluFp8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32).to(torch.bfloat16)
    q, sc = quantize_rows(lin.weight.detach())
    gelu_fp8 = GeluFp8Linear(q, sc, lin.bias, out_dtype=torch.bfloat16)
    s = slot("ff.net.2", [("ff.net.2", 0, 32)], 64, 32, dtype=torch.bfloat16)
    t = target(4, 64, 32, 1.0, 2, torch.bfloat16)
    s.write(0, {"ff.net.2": t}, 1.0)
    s.k = 1
    pre = torch.randn(4, 64, dtype=torch.bfloat16)
    out = LoraLinear(gelu_fp8, s, pre_gelu=True, fuse=False)(pre)
    exact = lin(F.gelu(pre, approximate="tanh")) + lora(F.gelu(pre, approximate="tanh"), t, 1.0)
    assert (out.float() - exact.float()).abs().max() / exact.float().abs().max() < 0.05
    without_gelu = gelu_fp8(pre) + s.delta(pre)  # what a wrapper that forgot the GELU would give
    assert (out.float() - without_gelu.float()).abs().max() > 0.01


@BRANCHES
def test_a_linear_with_its_gelu_in_the_same_call_adds_the_update_before_the_gelu(fuse):
    from optimizations.base import bind_forward
    from optimizations.fusions.gelu_epilogue import _linear_with_gelu_forward

    torch.manual_seed(0)
    proj_mlp = torch.nn.Linear(16, 24)
    plain = torch.nn.Linear(16, 24)
    plain.load_state_dict(proj_mlp.state_dict())
    bind_forward(proj_mlp, _linear_with_gelu_forward)  # the exact tier's epilogue rewrite
    s = slot("proj_mlp", [("proj_mlp", 0, 24)], 16, 24)
    t = target(4, 16, 24, 1.0, 3)
    s.write(0, {"proj_mlp": t}, 0.7)
    x = torch.randn(5, 16)
    reference = copy.deepcopy(proj_mlp)
    wrapped = LoraGeluOutput(proj_mlp, s, via_proj=False, fuse=fuse)
    assert (wrapped.appended is not None) == fuse
    assert torch.equal(wrapped(x), reference(x))  # k = 0: the epilogue's own call
    s.k = 1
    torch.testing.assert_close(wrapped(x), F.gelu(plain(x) + lora(x, t, 0.7), approximate="tanh"),
                               rtol=1e-5, atol=1e-5)


@BRANCHES
def test_a_split_proj_out_takes_the_update_from_both_halves_of_its_input(fuse):
    torch.manual_seed(0)
    dim, mlp = 8, 24
    linear = torch.nn.Linear(dim + mlp, dim)
    s = slot("proj_out", [("proj_out", 0, dim)], dim + mlp, dim, in_split=dim)
    t = target(4, dim + mlp, dim, 1.0, 4)
    s.write(0, {"proj_out": t}, 1.0)
    s.k = 1
    a, m = torch.randn(3, dim), torch.randn(3, mlp)
    x = torch.cat([a, m], -1)
    expected = linear(x) + lora(x, t, 1.0)
    for base in (copy.deepcopy(linear), SplitProjOut(linear, dim)):  # the bf16 weight views, the two-linear split
        wrapped = LoraProjOut(base, s, fuse=fuse)
        assert wrapped.fusable == fuse
        torch.testing.assert_close(wrapped(a, m), expected, rtol=1e-5, atol=1e-5)
    # a block that calls proj_out on the concatenation (the split switched off)
    torch.testing.assert_close(LoraProjOut(copy.deepcopy(linear), s, fuse=fuse)(x), expected, rtol=1e-5, atol=1e-5)


# ---- the fused branch -----------------------------------------------------------------------------------------------
QKV_PARTS = [("to_q", 0, 12), ("to_k", 12, 12), ("to_v", 24, 12)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_fused_branch_equals_the_lora_formula_for_one_two_and_three_adapters_on_fused_qkv_parts(k):
    torch.manual_seed(0)
    qkv = torch.nn.Linear(16, 36)
    reference = copy.deepcopy(qkv)
    s = slot("attn.to_qkv", QKV_PARTS, 16, 36, rank=4)
    wrapped = LoraLinear(qkv, s)
    adapters = [({"to_q": target(4, 16, 12, 2.0, 1), "to_v": target(3, 16, 12, 0.5, 2)}, 1.5),
                ({"to_k": target(4, 16, 12, 1.0, 3), "to_q": target(2, 16, 12, 1.0, 4)}, -1.0),
                ({"to_v": target(4, 16, 12, 0.25, 5), "to_k": target(1, 16, 12, 3.0, 6)}, 0.7)]
    for i, (targets, scale) in enumerate(adapters):
        s.write(i, targets, scale)
    s.k = k
    x = torch.randn(2, 5, 16)
    parts = list(reference(x).chunk(3, -1))
    for targets, scale in adapters[:k]:
        for p, name in enumerate(("to_q", "to_k", "to_v")):
            if name in targets:
                parts[p] = parts[p] + lora(x, targets[name], scale)
    out = wrapped(x)
    torch.testing.assert_close(out, torch.cat(parts, -1), rtol=1e-5, atol=1e-5)
    s.fused = False  # the side branch computes the same
    torch.testing.assert_close(wrapped(x), out, rtol=1e-5, atol=1e-5)


def test_the_base_weight_and_the_slots_A_are_views_of_one_extended_weight_and_k_zero_is_the_base_module():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 24)
    reference = copy.deepcopy(linear)
    s = slot("x", [("x", 0, 24)], 16, 24)
    wrapped = LoraLinear(linear, s)
    ext = wrapped.appended.weight
    assert isinstance(wrapped.appended, LinearRows) and s.home is wrapped.appended and s.mirrors == []
    assert ext.shape == (24 + s.A.shape[0], 16)
    # one storage: the base weight its first rows, the slot's A the rest (nothing duplicated)
    for t in (linear.weight, s.A):
        assert t.untyped_storage().data_ptr() == ext.untyped_storage().data_ptr()
    assert linear.weight.data_ptr() == ext.data_ptr() and s.A.data_ptr() == ext[24:].data_ptr()
    assert linear.weight.is_contiguous() and linear.weight.stride() == reference.weight.stride()
    assert isinstance(linear.weight, torch.nn.Parameter) and isinstance(linear.bias, torch.nn.Parameter)
    assert linear.bias.data_ptr() == wrapped.appended.bias.data_ptr()
    s.write(0, {"x": target(8, 16, 24, 1.0, 1)}, 1.0)
    assert torch.equal(ext[24:24 + 8], s.A[:8]) and torch.equal(linear.weight, reference.weight)
    x = torch.randn(3, 16)
    assert torch.equal(wrapped(x), reference(x))  # k = 0: the base module's code on the same values, bit for bit
    assert s.nbytes == (s.A.numel() + s.B.numel() + s.A.shape[0]) * 4  # A counted once; the bias's zeros


def test_the_fused_branch_returns_the_base_columns_of_the_one_gemm_output_without_a_copy():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 24)
    s = slot("x", [("x", 0, 24)], 16, 24)
    wrapped = LoraLinear(linear, s)
    s.write(0, {"x": target(8, 16, 24, 1.0, 1)}, 1.0)
    s.k = 2
    x = torch.randn(2, 5, 16)
    out = wrapped(x)
    n = 2 * s.rows
    assert out.shape == (2, 5, 24) and out.stride() == (5 * (24 + n), 24 + n, 1)  # rows of the wider GEMM output
    assert out.untyped_storage().nbytes() == 2 * 5 * (24 + n) * 4
    # the op adds in place into the base columns and leaves the down-projection's columns
    y = torch.randn(7, 24 + n)
    expected = y[:, :24] + y[:, 24:] @ s.B[:, :n].t()
    h = y[:, 24:].clone()
    lora_up_add_(y, s.B)
    torch.testing.assert_close(y[:, :24], expected)
    assert torch.equal(y[:, 24:], h)


def test_a_scale_change_rewrites_b_only_and_scale_zero_adds_exact_zeros():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 24)
    reference = copy.deepcopy(linear)
    s = slot("x", [("x", 0, 24)], 16, 24)
    wrapped = LoraLinear(linear, s)
    t = target(8, 16, 24, 0.5, 1)
    s.write(0, {"x": t}, 1.0)
    a = s.A.clone()
    s.write(0, {"x": t}, -2.0, weights=False)
    assert torch.equal(s.A, a)
    s.k = 1
    x = torch.randn(3, 16)
    torch.testing.assert_close(wrapped(x), reference(x) + lora(x, t, -2.0), rtol=1e-5, atol=1e-5)
    s.write(0, {"x": t}, 0.0, weights=False)
    torch.testing.assert_close(wrapped(x), reference(x), rtol=0, atol=0)


def _fp8_branch_error(wrapped: LoraLinear, x_rows, exact_input: torch.Tensor) -> float:
    """The fused fp8 branch's relative error against the bf16 formula, from the one GEMM's appended columns."""
    s = wrapped.slot
    n, out = s.k * s.rows, s.out_features
    with torch.no_grad():
        h = wrapped.appended(wrapped.base, x_rows, n)[..., out:].float()
        got = h @ s.B[:, :n].float().t()
        ref = (exact_input.float() @ s.A[:n].float().t()) @ s.B[:, :n].float().t()
    return float((got - ref).norm() / ref.norm())


# e4m3 keeps 3 mantissa bits: the fused branch rounds both the input rows (as the base GEMM does) and A's rows, where
# the side branch rounded only the input; measured ~0.035 here against ~0.02 for the side branch (and 0.002 for bf16).
FP8_BRANCH_BOUND = 0.06


def test_an_fp8_linear_with_appended_rows_runs_the_branch_in_its_gemm_on_the_fp8_input_rows():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96).to(torch.bfloat16)
    fp8 = Fp8Linear.from_float(lin)
    reference = copy.deepcopy(fp8)
    s = slot("to_out", [("to_out", 0, 96)], 256, 96, rank=16, dtype=torch.bfloat16)
    t = DeviceTarget((torch.randn(16, 256) / 16).bfloat16(), (torch.randn(96, 16) * 0.05 / 4).bfloat16(), 1.0)
    wrapped = LoraLinear(fp8, s)
    assert isinstance(wrapped.appended, ScaledRows) and s.mirrors == [wrapped.appended]
    ext = wrapped.appended.weight
    assert ext.dtype == torch.float8_e4m3fn and fp8.weight_t.data_ptr() == ext.data_ptr()
    assert fp8.weight_scale.data_ptr() == wrapped.appended.weight_scale.data_ptr()
    s.write(0, {"to_out": t}, 1.0)
    q, sc = quantize_rows(s.A[:s.rows])  # the appended rows: A quantised per row, its scales after the weight's
    assert torch.equal(ext[96:96 + s.rows].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(wrapped.appended.weight_scale[0, 96:96 + s.rows], sc.reshape(-1))
    for k in (1, 2, 3):  # each adapter count's bias a whole buffer (inductor's _scaled_mm template fails on a slice)
        bias_k = wrapped.appended._biases[k]
        assert bias_k.shape == (96 + k * s.rows,) and bias_k.untyped_storage().nbytes() == bias_k.numel() * 2
        assert torch.equal(bias_k, wrapped.appended.bias[:96 + k * s.rows])
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    x[:, :4] *= 20  # a few outlier channels, as real activations have
    rows = Fp8Rows(*quantize_rows(x))
    for inp in (rows, x):  # fp8 rows from the producing kernel, or a tensor the module quantises
        assert torch.equal(wrapped(inp), reference(inp))  # k = 0: bit for bit
    s.k = 1
    for inp in (rows, x):
        assert _fp8_branch_error(wrapped, inp, x) < FP8_BRANCH_BOUND
        # against the fp8 base plus the exact update: what the branch adds to the fp8 tier's own error
        exact_update = reference(inp).float() + F.linear(F.linear(x.float(), t.a.float()), t.b.float())
        assert (wrapped(inp).float() - exact_update).abs().max() / exact_update.abs().max() < 0.01


def test_a_gelu_fp8_linear_with_appended_rows_uses_its_gelu_fused_quantisation_for_the_branch():
    from optimizations.fp8.gelu_quant import GeluFp8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32).to(torch.bfloat16)
    q, sc = quantize_rows(lin.weight.detach())
    gelu_fp8 = GeluFp8Linear(q, sc, lin.bias, out_dtype=torch.bfloat16)
    reference = copy.deepcopy(gelu_fp8)
    s = slot("ff.net.2", [("ff.net.2", 0, 32)], 64, 32, dtype=torch.bfloat16)
    t = target(4, 64, 32, 1.0, 2, torch.bfloat16)
    wrapped = LoraLinear(gelu_fp8, s, pre_gelu=True)
    s.write(0, {"ff.net.2": t}, 1.0)
    pre = torch.randn(16, 64, dtype=torch.bfloat16)
    assert torch.equal(wrapped(pre), reference(pre))
    s.k = 1
    gelu = F.gelu(pre, approximate="tanh")
    out = wrapped(pre)
    exact = lin(gelu) + lora(gelu, t, 1.0)
    assert (out.float() - exact.float()).abs().max() / exact.float().abs().max() < 0.05
    assert _fp8_branch_error(wrapped, pre, gelu) < FP8_BRANCH_BOUND


def test_a_gelu_fp8_linear_reads_the_row_strided_base_columns_of_a_wider_output_where_they_lie():
    from optimizations.fp8.gelu_quant import GeluFp8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32).to(torch.bfloat16)
    q, sc = quantize_rows(lin.weight.detach())
    gelu_fp8 = GeluFp8Linear(q, sc, lin.bias, out_dtype=torch.bfloat16)
    wide = torch.randn(2, 8, 64 + 32, dtype=torch.bfloat16)
    view = wide[..., :64]  # what an fp8 ff.net.0 with appended rows hands to ff.net.2
    assert torch.equal(gelu_fp8(view), gelu_fp8(view.contiguous()))


def test_a_split_fp8_proj_out_appends_each_halfs_column_block_of_a_quantised_on_its_own():
    from optimizations.fp8.gelu_quant import GeluFp8Linear

    torch.manual_seed(0)
    dim, mlp = 32, 64
    linear = torch.nn.Linear(dim + mlp, dim).to(torch.bfloat16)
    split = SplitProjOut(linear, dim)
    split.attn = Fp8Linear.from_float(split.attn)
    q, sc = quantize_rows(split.mlp.weight.detach())
    split.mlp = GeluFp8Linear(q, sc, split.mlp.bias, out_dtype=torch.bfloat16)  # the fp8 copy's MLP half
    reference = copy.deepcopy(split)
    s = slot("proj_out", [("proj_out", 0, dim)], dim + mlp, dim, rank=16, in_split=dim, dtype=torch.bfloat16)
    t = DeviceTarget((torch.randn(16, dim + mlp) / 10).bfloat16(), (torch.randn(dim, 16) * 0.05 / 4).bfloat16(), 1.0)
    wrapped = LoraProjOut(split, s)
    assert wrapped.fusable and wrapped.appended_attn.cols == slice(0, dim)
    s.write(0, {"proj_out": t}, 1.0)
    assert torch.equal(wrapped.appended_mlp.weight[dim:dim + s.rows].view(torch.uint8),
                       quantize_rows(s.A[:s.rows, dim:])[0].view(torch.uint8))
    a = torch.randn(24, dim, dtype=torch.bfloat16)
    pre = torch.randn(24, mlp, dtype=torch.bfloat16)
    a_rows = Fp8Rows(*quantize_rows(a))
    assert torch.equal(wrapped(a_rows, pre), reference(a_rows, pre))
    s.k = 1
    x = torch.cat([a, F.gelu(pre, approximate="tanh")], -1)
    n = s.rows
    with torch.no_grad():
        y = wrapped.appended_attn(split.attn, a_rows, n) + wrapped.appended_mlp(split.mlp, pre, n)
        got = y[:, dim:].float() @ s.B[:, :n].float().t()
        ref = (x.float() @ s.A[:n].float().t()) @ s.B[:, :n].float().t()
    assert float((got - ref).norm() / ref.norm()) < FP8_BRANCH_BOUND
    exact = linear(x) + lora(x, t, 1.0)
    assert (wrapped(a_rows, pre).float() - exact.float()).abs().max() / exact.float().abs().max() < 0.05


def test_switching_adapters_rewrites_the_appended_rows_in_place_quantising_each_adapter_once(monkeypatch):
    import kontext_server.lora.fused_rows as fused_rows

    quantised_rows = []
    monkeypatch.setattr(fused_rows, "quantize_rows",
                        lambda x: quantised_rows.append(tuple(x.shape)) or quantize_rows(x))
    torch.manual_seed(0)
    bf16 = torch.nn.Linear(32, 48)
    fp8 = Fp8Linear.from_float(torch.nn.Linear(32, 48).to(torch.bfloat16))
    s = slot("x", [("x", 0, 48)], 32, 48)
    exact, fp8_rows = LoraLinear(bf16, s), LoraLinear(fp8, s)  # the exact variant's rows are A; the fp8 copy's mirror
    assert s.home is exact.appended and s.mirrors == [fp8_rows.appended]
    pointers = [t.data_ptr() for t in (exact.appended.weight, fp8_rows.appended.weight,
                                       fp8_rows.appended.weight_scale, s.A, s.B)]
    adapters = [target(8, 32, 48, 1.0, seed) for seed in (1, 2, 3)]
    quantised_rows.clear()
    for t in adapters + adapters:  # each adapter twice: loaded adapters switched back to
        s.write(0, {"x": t}, 1.0)
        assert torch.equal(s.A[:8], t.a)
        q, _ = quantize_rows(s.A[:s.rows])
        assert torch.equal(fp8_rows.appended.weight[48:48 + s.rows].view(torch.uint8), q.view(torch.uint8))
    assert [t.data_ptr() for t in (exact.appended.weight, fp8_rows.appended.weight,
                                   fp8_rows.appended.weight_scale, s.A, s.B)] == pointers
    assert quantised_rows == [(8, 32)] * 3  # once per adapter, at its first write; a switch back only copies


def test_the_side_branch_only_runs_where_the_module_cannot_take_appended_rows():
    other = slot("x", [("x", 0, 24)], 16, 24)
    assert LoraLinear(torch.nn.Linear(16, 24), other, fuse=False).appended is None
    conv = torch.nn.Conv1d(16, 24, 1)  # not a linear: no rows, and the reason says what it is
    conv.in_features, conv.out_features = 16, 24
    wrapped = LoraLinear(conv, slot("c", [("c", 0, 24)], 16, 24))
    assert wrapped.appended is None and "Conv1d" in wrapped.unfused_reason


def test_under_inductor_the_fused_branch_is_one_wider_gemm_and_an_in_place_add_and_a_switch_recompiles_nothing():
    """The generated code (inductor on CPU: the same graph passes as on the GPU, other kernels) runs one GEMM over
    the base and appended rows and the up-projection in place on its output buffer, with no copy of it between them
    (an `addmm_` on a slice would be functionalised into a copy and a scatter), and the consumer reads the base
    columns where they lie."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._inductor.utils import run_and_get_code

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 96)

        def forward(self, x, r):
            return r + 2 * self.lin(x)

    torch.manual_seed(0)
    block = Block()
    s = slot("lin", [("lin", 0, 96)], 64, 96)
    block.lin = LoraLinear(block.lin, s)
    s.write(0, {"lin": target(8, 64, 96, 1.0, 1)}, 1.0)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    x, r = torch.randn(1, 40, 64), torch.randn(1, 40, 96)
    try:
        with torch.no_grad():
            s.k = 0
            assert torch.equal(compiled(x, r), block(x, r))
            s.k = 1
            out, (code,) = run_and_get_code(compiled, x, r)
            torch.testing.assert_close(out, block(x, r), rtol=1e-5, atol=1e-5)
            call = code[code.index("def call"):]
            gemm = [line for line in call.splitlines() if "extern_kernels." in line]
            assert len(gemm) == 1 and f"(64, {96 + s.rows}), (1, 64)" in gemm[0]  # W_ext[:out + n], transposed
            buffer = gemm[0].split("out=")[1].rstrip(")")
            up = [line for line in call.splitlines() if "lora_up_add_" in line and "(" in line and "#" not in line]
            assert len(up) == 1 and f"reinterpret_tensor({buffer}," in up[0]  # in place on the GEMM's output
            assert "clone" not in call and "copy_" not in call
            frames = counter.frame_count
            for seed, scale in ((2, 0.5), (3, -1.0)):
                t = target(8, 64, 96, 1.0, seed)
                s.write(0, {"lin": t}, scale)
                base = block.lin.base(x)
                torch.testing.assert_close(compiled(x, r), r + 2 * (base + lora(x, t, scale)), rtol=1e-4, atol=1e-4)
            assert counter.frame_count == frames, "an adapter switch recompiled"
    finally:
        torch._dynamo.reset()
