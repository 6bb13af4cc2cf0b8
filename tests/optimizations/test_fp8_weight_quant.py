"""optimizations/kernels/fp8_weight_quant.py (on CPU in Triton's interpreter, with the GPU's cast rounding: see
tests/conftest.py): the one-pass weight quantisation gives exactly the bytes and scales of the two functions it stands
in for, torchao's row-wise float8 (the GPU's fp8 copy) and quantize_rows, on rows of the model's widths and an odd
one, with outliers; and where those two functions disagree, it follows the one it is asked for."""
from __future__ import annotations

from pathlib import Path

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


def segment_rows(n, k, seed):
    """An update (A (r, k), B (n, r)) of rank r in bf16, as an adapter's."""
    g = torch.Generator().manual_seed(seed)
    r = (4, 8, 32)[seed % 3]
    return (torch.randn(r, k, generator=g) * 0.1).to(torch.bfloat16), (torch.randn(n, r, generator=g) * 0.05).to(
        torch.bfloat16)


def reference(w: torch.Tensor, updates, quantiser: str):
    """Q(W + sum s B A), accumulated in fp32 and rounded once to bf16."""
    m = w.float()
    for a, b, s in updates:
        m.addmm_(b.float(), a.float(), alpha=s)
    return QUANTISERS[quantiser](m.to(w.dtype))


def grouped(parts, rounding: str, **launch):
    """Each (source, updates) written by one launch into fresh fp8 rows of a larger tensor (rows at an offset, a row
    stride wider than the weight); returns each one's (rows, scales)."""
    from optimizations.kernels.fp8_weight_quant import Segment, merge_weight_rows

    out, segments = [], []
    for w, updates in parts:
        n, k = w.shape
        q = torch.zeros(n + 8, k + 16, dtype=torch.float8_e4m3fn)[4:4 + n, :k]
        s = torch.zeros(n + 8, dtype=torch.float32)[4:4 + n]
        segments.append(Segment(w, q, s, updates))
        out.append((q, s))
    merge_weight_rows(segments, scale_in_weight_dtype=rounding == "torchao", **launch)
    return out


@pytest.mark.parametrize("kernel", ["one-pass", "tiled"])
@pytest.mark.parametrize("rounding", ["torchao", "quantize_rows"])
def test_one_launch_over_many_weights_with_no_update_gives_each_ones_quantisation_bit_for_bit(rounding, kernel):
    """A restore (the one-pass kernel) and the rows a merge leaves without an update (the tiled one)."""
    wide = weight((40, 4096), seed=4)
    parts = [(weight(s, seed=i), []) for i, s in enumerate(SHAPES)] + [(wide[:, 1024:3072], [])]  # a column block
    launch = {"config": {"BM": 16, "BK": 256, "num_warps": 4}, "one_pass": False} if kernel == "tiled" else {}
    for (w, _), got in zip(parts, grouped(parts, rounding, **launch)):
        assert same(got, QUANTISERS[rounding](w.contiguous()))


def update_rows_reference(w: torch.Tensor, updates, quantiser: str):
    """Q(W + U) rounded once to bf16, U = sum s B A as the update-rows GEMM writes it: rounded to bf16 itself
    (several updates stacked, each s B rounded to bf16 first)."""
    if len(updates) == 1:
        a, b, s = updates[0]
        u = (b.float() @ a.float() * s).to(w.dtype)
    else:
        u = (torch.cat([(b * s).float() for _, b, s in updates], 1)
             @ torch.cat([a.float() for a, _, _ in updates], 0)).to(w.dtype)
    return QUANTISERS[quantiser]((w.float() + u.float()).to(w.dtype))


WAYS = {"tiled": {}, "gemm-first": {"gemm_first": True}, "update-rows": {"gemm_first": True, "update_rows": True}}


@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize("rounding", ["torchao", "quantize_rows"])
def test_one_launch_merges_each_weights_updates_as_torch_would_up_to_the_gemms_summation_order(rounding, way):
    """The tiled kernel computing the updates in fp32 over W; cuBLAS's addmm into scratch rows quantised by the
    one-pass kernel (several updates stacked into one GEMM, B scaled in bf16 first: a little further from the fp32
    sum); and cuBLAS writing s B A alone into scratch rows that the one-pass kernel adds to W (U rounded to bf16 on
    its own, then the sum: further from the fp32 sum where U is large against W, as in these weights)."""
    parts = []
    for i, (n, k) in enumerate([(48, 3072), (8, 1000), (40, 2048)]):
        w = weight((n, k), seed=10 + i)
        updates = [(*segment_rows(n, k, 3 * i + j), scale) for j, scale in enumerate((1.0, -0.7, 0.35)[:i + 1])]
        parts.append((w, updates))
    for (w, updates), (q, s) in zip(parts, grouped(parts, rounding, **WAYS[way])):
        rq, rs = reference(w, updates, rounding)
        base = QUANTISERS[rounding](w)
        assert not torch.equal(q.view(torch.uint8), base[0].view(torch.uint8))  # the update is there
        # the merged bf16 value may round the other way where the GEMMs sum in another order: rarely, by one step
        own = update_rows_reference(w, updates, rounding)[0] if way == "update-rows" else rq
        differ = (q.float() != own.float()).float().mean().item()
        # one update: cuBLAS rounds W + s B A once, as the fp32 sum; several: s B is rounded to bf16 first (as the
        # slots' B is), which moves a few values across an fp8 step
        assert differ < (0.05 if way == "gemm-first" and len(updates) > 1 else 2e-3), differ
        got, ref = q.float() * s[:, None], rq.float() * rs.reshape(-1, 1)
        # e4m3's step is 6-12% of a value; the update rows' own rounding moves some values a step (U here is half of
        # W; an adapter's is usually a few percent of it)
        assert ((got - ref).norm() / ref.norm()).item() < (0.02 if way == "update-rows" else 0.01)
        assert torch.allclose(s, rs.reshape(-1).float(), rtol=1e-2)


@pytest.mark.parametrize("way", list(WAYS))
def test_weights_split_into_row_pieces_and_launched_in_chunks_are_written_as_by_one_launch(monkeypatch, way):
    """Long blocks of rows split into segments of their own (B's rows with them), tables launched as they fill, and
    segments with and without updates and of different widths in tables apart: the same bytes as one launch."""
    from optimizations.kernels import fp8_weight_quant

    parts = []
    for i, (n, k) in enumerate([(48, 3072), (8, 1000), (40, 2048), (24, 512)]):
        w = weight((n, k), seed=20 + i)
        parts.append((w, [] if i % 2 else [(*segment_rows(n, k, 5 + i), 0.8)]))
    whole = grouped(parts, "torchao", **WAYS[way])
    launches = []
    real = fp8_weight_quant.Launch._launch
    monkeypatch.setattr(fp8_weight_quant.Launch, "_launch",
                        lambda self, t: launches.append(t.segments) or real(self, t))
    monkeypatch.setattr(fp8_weight_quant, "SEGMENT_ROWS", 16)
    monkeypatch.setattr(fp8_weight_quant, "CHUNK_SEGMENTS", 2)
    pieces = grouped(parts, "torchao", **WAYS[way])
    # ceil(n / 16) segments each; a table is launched once it holds two, the one left over (8 rows, no update, its
    # own width) at the end
    assert launches == [3, 3, 2, 1]
    for a, b in zip(whole, pieces):
        assert same(a, b)


def test_the_merge_writes_with_the_kernel_straight_into_the_linears_storage_and_restores_it_bit_for_bit(monkeypatch):
    """A fused q/k/v-like target (three parts of 32 rows; the adapter reaches two) and the two column halves of a
    split proj_out, all in one launch of the tiled kernel (which sums in fp32, as the one-by-one path does: the
    gemm-first default rounds the sum to bf16 first, tested above), against the same targets written one by one with
    torchao's function."""
    from types import SimpleNamespace

    from kontext_server.lora import fp8_merge
    from kontext_server.lora.fp8_merge import Fp8Merge, Target
    from kontext_server.lora.store import DeviceTarget

    monkeypatch.setitem(fp8_merge.KERNEL, "gemm_first", False)

    def targets(quantiser):
        qkv_w, proj_w = weight((96, 512), seed=20), weight((64, 1024), seed=21)
        qkv = Fp8Linear(*QUANTISERS["torchao"](qkv_w), None, out_dtype=torch.bfloat16)
        halves = [Fp8Linear(*QUANTISERS["torchao"](proj_w[:, c].contiguous()), None, out_dtype=torch.bfloat16)
                  for c in (slice(0, 384), slice(384, None))]
        qkv_slot = SimpleNamespace(name="qkv", parts=[("q", 0, 32), ("k", 32, 32), ("v", 64, 32)])
        proj_slot = SimpleNamespace(name="proj", parts=[("proj", 0, 64)])
        return [Target("qkv", qkv, qkv_w, qkv_slot, slice(None), quantiser),
                Target("proj.attn", halves[0], proj_w[:, :384], proj_slot, slice(0, 384), quantiser),
                Target("proj.mlp", halves[1], proj_w[:, 384:], proj_slot, slice(384, None), quantiser)]

    def adapter(seed):
        g = torch.Generator().manual_seed(seed)

        def t(n, k, r):
            return DeviceTarget((torch.randn(r, k, generator=g) * 0.1).to(torch.bfloat16),
                                (torch.randn(n, r, generator=g) * 0.05).to(torch.bfloat16), 0.5)
        return SimpleNamespace(rank=8, targets={"q": t(32, 512, 8), "v": t(32, 512, 8), "proj": t(64, 1024, 4)})

    fast, slow = targets("triton_torchao"), targets("torchao")
    assert all(t.grouped for t in fast) and not any(t.grouped for t in slow)
    pristine = [(t.rows.view(torch.uint8).clone(), t.linear.weight_scale.clone()) for t in fast]
    storage = [t.rows.data_ptr() for t in fast]
    adapters = [(adapter(1), 1.0), (adapter(2), -0.4)]
    for ts in (fast, slow):
        assert Fp8Merge(ts, {}).apply("x", adapters)
    for f, s_ in zip(fast, slow):
        assert f.rows.data_ptr() == storage[fast.index(f)]
        differ = (f.rows.float() != s_.rows.float()).float().mean().item()
        assert 0 <= differ < 2e-3, (f.name, differ)
        assert not torch.equal(f.rows.view(torch.uint8), pristine[fast.index(f)][0])
    k_rows = slice(32, 64)  # no adapter reaches k: its rows keep the base quantisation exactly
    assert torch.equal(fast[0].rows[k_rows].view(torch.uint8), pristine[0][0][k_rows])
    merge = Fp8Merge(fast, {})
    merge.state = "x"
    for t in fast:
        t.holds = "x"
    assert merge.restore()
    assert all(torch.equal(t.rows.view(torch.uint8), p[0]) and torch.equal(t.linear.weight_scale, p[1])
               for t, p in zip(fast, pristine))


def test_the_merge_kernel_is_checked_before_use_and_a_failing_one_leaves_merges_to_each_linear(monkeypatch):
    """A kernel that raises, or writes nothing, is reported; a merge then writes linear by linear (torch's sum and the
    one-pass quantisation), restores still in one launch."""
    from types import SimpleNamespace

    from kontext_server.lora.fp8_merge import Fp8Merge, Target, merge_kernel_problem
    from kontext_server.lora.store import DeviceTarget
    from optimizations.kernels import fp8_weight_quant as kernels

    assert merge_kernel_problem(torch.device("cpu"), torch.bfloat16) is None
    real_run = kernels.Launch.run
    monkeypatch.setattr(kernels.Launch, "run", lambda self: None)  # writes nothing
    assert "away from torch's sum" in merge_kernel_problem(torch.device("cpu"), torch.bfloat16)

    def no_image(self):
        raise RuntimeError("no kernel image is available for execution on the device")
    monkeypatch.setattr(kernels.Launch, "run", no_image)
    assert "no kernel image" in merge_kernel_problem(torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(kernels.Launch, "run", real_run)

    w = weight((32, 256), seed=30)
    linear = Fp8Linear(*QUANTISERS["torchao"](w), None, out_dtype=torch.bfloat16)
    pristine = linear.weight_t.t().view(torch.uint8).clone()
    target = Target("m", linear, w, SimpleNamespace(name="m", parts=[("m", 0, 32)]), slice(None), "triton_torchao")
    g = torch.Generator().manual_seed(31)
    adapter = SimpleNamespace(rank=8, targets={"m": DeviceTarget((torch.randn(8, 256, generator=g) * 0.1).bfloat16(),
                                                         (torch.randn(32, 8, generator=g) * 0.05).bfloat16(), 1.0)})
    launched, written = [], []
    real_add, real_write = kernels.Launch.add, Target.write
    monkeypatch.setattr(kernels.Launch, "add", lambda self, *a: (launched.append(bool(a[-1])), real_add(self, *a))[1])
    monkeypatch.setattr(Target, "write", lambda self, adapters: (written.append(bool(adapters)),
                                                                  real_write(self, adapters))[1])
    merge = Fp8Merge([target], {}, merge_kernel_problem="RuntimeError: no kernel image")
    # the linear's own write: torch's sum, then the one-pass kernel with no update
    assert merge.apply("x", [(adapter, 1.0)]) and written == [True] and launched == [False]
    expected = QUANTISERS["triton_torchao"](target.merged([(adapter, 1.0)]))
    assert same((target.rows, linear.weight_scale), expected)
    launched.clear()
    assert merge.restore() and launched == [False] and written == [True]  # the restore: the grouped launch
    assert torch.equal(target.rows.view(torch.uint8), pristine)
    assert merge.report()["merge_kernel"] == "RuntimeError: no kernel image"


def test_a_launch_is_marked_aligned_only_where_every_segments_pointers_strides_and_width_are(monkeypatch):
    """What decides the kernels' vector accesses (ALIGNED): a weight of FLUX's widths in fresh storage is aligned; a
    column block one element in, or a width not a multiple of 16, makes its whole launch unaligned; the values are
    the same either way."""
    from optimizations.kernels import fp8_weight_quant

    seen = []
    real = fp8_weight_quant.Launch._launch
    monkeypatch.setattr(fp8_weight_quant.Launch, "_launch", lambda self, t: seen.append(t.aligned) or real(self, t))
    wide = weight((16, 3088), seed=30)
    cases = {"aligned": [weight((16, 3072), seed=31)], "a column block one element in": [wide[:, 1:3073]],
             "mixed": [weight((16, 3072), seed=31), wide[:, 1:3073]], "width 1000": [weight((8, 1000), seed=32)]}
    expected = {"aligned": [True], "a column block one element in": [False], "mixed": [False],
                "width 1000": [False]}
    for name, ws in cases.items():
        seen.clear()
        for w, got in zip(ws, grouped([(w, []) for w in ws], "torchao")):
            assert same(got, QUANTISERS["torchao"](w.contiguous())), name
        assert seen == expected[name], name


SM90_ACCESSES = """
import json, re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from optimizations.kernels import fp8_weight_quant as q
names = ["BLOCK", "ROWS", "FIELDS", "DTYPE", "SCALE_IN_WEIGHT_DTYPE", "ALIGNED", "ADD"]
out = {}
for aligned, add in ((False, False), (True, False), (False, True), (True, True)):
    src = ASTSource(fn=q.restore_rows_fp8_kernel, signature={"table_ptr": "*i64", **{n: "constexpr" for n in names}},
                    constexprs=dict(zip(names, [4096, 8, q.FIELDS, tl.bfloat16, True, aligned, add])))
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
    out[f"{aligned} {add}"] = [sorted(set(re.findall(r"ld\\.global\\.(\\S+)", ptx))),
                         sorted(set(re.findall(r"st\\.global\\.(\\S+)", ptx)))]
print(json.dumps(out))
"""


def sm90_accesses() -> dict:
    """{(aligned, add): (global load widths, store widths)} in the one-pass kernel's PTX for an H100, compiled here
    (no GPU needed) in a process of its own: Triton's interpreter, which the other tests run the kernels in, cannot
    compile."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", SM90_ACCESSES], capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    return {tuple(x == "True" for x in k.split()): (set(v[0]), set(v[1]))
            for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def test_an_aligned_launch_moves_sixteen_bytes_per_access_where_an_unaligned_one_moves_a_value_at_a_time():
    """The point of ALIGNED: without the hints the bf16 weight is read two bytes and the fp8 rows written one byte
    per instruction (the table's addresses are invisible to Triton); with them, 16 bytes (v4.b32). The same with
    ADD (update rows added to W: the gemm-first way's update_rows), whose rows are read as W's are."""
    accesses = sm90_accesses()
    for add in (False, True):
        loads, stores = accesses[(False, add)]
        assert "b16" in loads and "b8" in stores and "v4.b32" not in loads | stores, add
        loads, stores = accesses[(True, add)]
        assert "v4.b32" in loads and "v4.b32" in stores and "b16" not in loads and "b8" not in stores, add
