"""The slot mechanism on single modules (CPU): what each wrapper adds, for each kind of module the optimised
transformer has (a fused QKV linear, an fp8 linear fed fp8 rows, an fp8 linear fed the pre-GELU activation, a linear
with its GELU applied in the same call, the single blocks' split proj_out), against LoRA computed the plain way."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kontext_server.lora.slots import LoraGeluOutput, LoraLinear, LoraProjOut, LoraSlot
from kontext_server.lora.store import DeviceTarget
from optimizations.fp8.linear import Fp8Linear, Fp8Rows, quantize_rows
from optimizations.fusions.split_proj_out import SplitProjOut


def target(rank, n_in, n_out, scale, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return DeviceTarget(torch.randn(rank, n_in, generator=g).to(dtype), torch.randn(n_out, rank, generator=g).to(dtype),
                        scale)


def lora(x, t: DeviceTarget, s: float):
    return s * t.scale * F.linear(F.linear(x, t.a), t.b)


def slot(name, parts, n_in, n_out, rank=8, in_split=None, dtype=torch.float32):
    return LoraSlot(name, parts, n_in, n_out, rank, in_split, dtype, "cpu")


def test_a_fused_qkv_slot_computes_each_projections_own_update_block_diagonally():
    torch.manual_seed(0)
    qkv = torch.nn.Linear(16, 3 * 12)
    s = slot("attn.to_qkv", [("to_q", 0, 12), ("to_k", 12, 12), ("to_v", 24, 12)], 16, 36)
    wrapped = LoraLinear(qkv, s)
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


def test_a_new_adapter_in_a_slot_leaves_nothing_of_the_old_one():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    s = slot("x", [("x", 0, 12)], 16, 12)
    wrapped = LoraLinear(base, s)
    s.write(0, {"x": target(8, 16, 12, 1.0, 1)}, 1.0)
    s.write(0, {"x": target(2, 16, 12, 1.0, 2)}, 1.0)  # a smaller rank over a larger one
    s.k = 1
    x = torch.randn(3, 16)
    torch.testing.assert_close(wrapped(x), base(x) + lora(x, target(2, 16, 12, 1.0, 2), 1.0), rtol=1e-5, atol=1e-5)
    s.write(0, {}, 1.0)  # an adapter that does not target this module
    assert torch.equal(wrapped(x), base(x))


def test_an_fp8_linear_fed_fp8_rows_adds_the_update_of_the_dequantised_rows():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 48).to(torch.bfloat16)
    fp8 = Fp8Linear.from_float(lin)
    s = slot("to_out", [("to_out", 0, 48)], 32, 48, dtype=torch.bfloat16)
    t = target(8, 32, 48, 0.5, 1, torch.bfloat16)
    s.write(0, {"to_out": t}, 1.0)
    s.k = 1
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    rows = Fp8Rows(*quantize_rows(x))
    wrapped = LoraLinear(fp8, s)
    dequantised = (rows.data.float() * rows.scale).to(torch.bfloat16)
    assert torch.equal(wrapped(rows) - fp8(rows), (fp8(rows) + s.delta(dequantised)) - fp8(rows))
    # fp8 + adapter against bf16 + adapter: the fp8 tier's error, no more
    exact = lin(x) + lora(x, t, 1.0)
    assert (wrapped(rows).float() - exact.float()).abs().max() / exact.float().abs().max() < 0.05


def test_an_fp8_linear_fed_the_pre_gelu_activation_applies_the_gelu_to_the_branchs_input():
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
    out = LoraLinear(gelu_fp8, s, pre_gelu=True)(pre)
    exact = lin(F.gelu(pre, approximate="tanh")) + lora(F.gelu(pre, approximate="tanh"), t, 1.0)
    assert (out.float() - exact.float()).abs().max() / exact.float().abs().max() < 0.05
    without_gelu = gelu_fp8(pre) + s.delta(pre)  # what a wrapper that forgot the GELU would give
    assert (out.float() - without_gelu.float()).abs().max() > 0.01


def test_a_linear_with_its_gelu_in_the_same_call_adds_the_update_before_the_gelu():
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
    wrapped = LoraGeluOutput(proj_mlp, s, via_proj=False)
    assert torch.equal(wrapped(x), proj_mlp(x))  # k = 0: the epilogue's own call
    s.k = 1
    torch.testing.assert_close(wrapped(x), F.gelu(plain(x) + lora(x, t, 0.7), approximate="tanh"),
                               rtol=1e-5, atol=1e-5)


def test_a_split_proj_out_takes_the_update_from_both_halves_of_its_input():
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
    for base in (linear, SplitProjOut(linear, dim)):  # the bf16 weight views, and the two-linear split
        wrapped = LoraProjOut(base, s)
        torch.testing.assert_close(wrapped(a, m), expected, rtol=1e-5, atol=1e-5)
    # a block that calls proj_out on the concatenation (the split switched off)
    torch.testing.assert_close(LoraProjOut(linear, s)(x), expected, rtol=1e-5, atol=1e-5)
