"""The fused LoRA branch: a slot's down-projection rows appended under a module's weight, the update added in place.

The default (`FLUX_LORA_FUSED_BRANCH=0` gives slots.py's side branch instead): on an H100 it costs less per step
than the side branch on both tiers, most on the fp8 copy (tools/bench_lora.py; BENCHMARKS.md). The fp8 copy's bias
is passed to `_scaled_mm` as one whole buffer per adapter count: inductor's lowering failed a size check on a slice
of the appended bias. The slots themselves (S, Q, A, B, k) are described in slots.py.

- Down-projection inside the base GEMM. At install the module's weight is re-stored with the slot's A rows appended
  under it, W_ext = [W; A] of shape (out + S*Q, in), and the base module's weight becomes the view W_ext[:out]: the
  same values in a contiguous tensor of the same strides, so k = 0 is unchanged, and nothing is duplicated (on the
  exact tier the slot's A is itself the view W_ext[out:] of its bf16 linear; a bias gets S*Q zeros appended the same
  way). One GEMM, x W_ext[:out+n]^T, gives [base(x) | x A[:n]^T]: the layer input is read once.
  On the fp8 copy, W_ext is the fp8 weight with A's rows quantised to e4m3 per row, their scales appended to the
  weight's row scales: one `_scaled_mm` on the fp8 input rows the producing kernel already quantised gives both, so
  the branch neither dequantises its input nor recomputes the GELU of a GeluFp8Linear (the GELU-fused quantisation
  produced those rows). The price: A's rows rounded to e4m3 like the weights, an error the fp8 tier's own
  (tools/bench_lora.py reports the branch's error against bf16, and the images' fidelity).
- Up-projection added in a GEMM: `lora_up_add_` (a custom op) runs `y[:, :out] += y[:, out:] B[:, :n]^T` in place on
  that GEMM's output, cuBLAS's beta = 1 epilogue (C read once, written once), and the module returns the base
  columns y[..., :out], a view whose rows are out + n apart. Its consumers take a row stride as it is: elementwise
  code, the q/k norm + RoPE kernel, the fp8 norm and GELU quantisation kernels, an fp8 linear's input reshape. An op
  of its own because inductor keeps a mutating custom op in place on an intermediate buffer (tests/lora/test_slots.py
  reads the generated code), where an in-place `addmm_` on a slice is functionalised into an out-of-place addmm into
  a new buffer, which aten fills with a copy of C before its GEMM: one more pass over the layer's output.
  The adapters' A rows are copied into W_ext in place when the adapters change; the fp8 copy's rows are quantised
  once per loaded adapter (kept with it in the store, `DeviceTarget.fp8`), so a switch copies them too.
- Which modules: every block linear of both tiers. A plain Linear (bf16 tier: to_qkv, to_added_qkv, to_out,
  to_add_out, ff.net.0.proj, ff.net.2, proj_mlp), an fp8 linear (Fp8Linear / GeluFp8Linear: the same ones of the
  fp8 copy), and a single block's proj_out: a Linear (called on the concatenation, or on its two halves through
  column views of W_ext: the halves' sum is [base | x A^T]) or, on the fp8 copy, a SplitProjOut whose halves each
  get their column block of A (quantised per row on its own, as each half's weight is; the sum the split computes
  anyway adds the two halves' down-projections too). The exact tier's cuBLASLt GELU-epilogue linears (ff.net.0.proj,
  proj_mlp) take the rows too, but with adapters they lose the epilogue on either branch: cuBLASLt would apply the
  GELU to the appended columns and before the update, so the GEMM runs plain and the GELU is a pass of its own
  (`LoraGeluOutput`). What cannot, keeps slots.py's side branch: the modulation table (its fill runs once per request
  on one conditioning vector, not per token: nothing to save) and any weight that is not a plain tensor (torchao's
  subclasses, with FLUX_FP8_PLAIN_LINEARS=0 or MXFP4).
- What is left: the up-projection's pass over each output (C read and written once by the beta = 1 GEMM, where the
  side branch wrote its update and read it again in the add), and the GELU pass of the exact tier's GELU-epilogue
  linears. Removing those would take the update into the base GEMM's own main loop, or into each consumer's kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kontext_server.lora.batched_writes import SlotWrites
from kontext_server.request import MAX_LORAS_PER_REQUEST
from optimizations.fp8.linear import Fp8Linear, quantize_rows

SLOTS = MAX_LORAS_PER_REQUEST


@torch.library.custom_op("flux_kontext::lora_up_add_", mutates_args=("y",))
def lora_up_add_(y: torch.Tensor, b: torch.Tensor) -> None:
    """The fused branch's up-projection, in place: y (..., out + n) is [base | h] as the extended GEMM wrote it
    (contiguous), b the slot's B (out, >= n); y[..., :out] += h @ b[:, :n]^T, one GEMM with beta = 1 writing into
    y's own rows (row stride out + n): the update is added by the GEMM (C read and written once), with no separate
    add and no copy."""
    out = b.shape[0]
    y2 = y.view(-1, y.shape[-1])
    y2[:, :out].addmm_(y2[:, out:], b[:, :y2.shape[1] - out].t())


@lora_up_add_.register_fake
def _(y, b):
    return None


class AppendedRows(torch.nn.Module):
    """A linear-like module's weight (and bias) re-stored with a slot's S*Q rows of A (or a column block `cols` of
    them) appended under it; the module's own weight, bias (and fp8 scales) become views of the first `out` rows.
    `forward(base, x, n)`: the module's output and the first n appended rows' in one GEMM, (..., out + n).

    Contract: made once at install, on the module's device, before anything is compiled; the module must not be
    moved or re-materialised afterwards (that would break the sharing). `extra_nbytes`: memory beyond the module's
    own (the appended rows where they are a mirror, the appended bias zeros)."""

    cols: slice
    out_features: int
    weight: torch.Tensor

    def refresh(self, a: torch.Tensor, start: int, stop: int) -> None:
        """Rows [start, stop) from the slot's A (at attach)."""
        raise NotImplementedError

    def put(self, r0: int, t, writes) -> None:
        """One adapter target's rows (a DeviceTarget's `a`, or its column block) at slot row r0 (at a write),
        recorded in `writes` (SlotWrites)."""
        raise NotImplementedError

    @property
    def bias_nbytes(self) -> int:
        """The zeros appended to the bias."""
        return 0 if self.bias is None else (self.bias.numel() - self.out_features) * self.bias.element_size()

    @property
    def extra_nbytes(self) -> int:
        """The appended rows (weight, scales) and the bias's zeros: what this module adds as a mirror."""
        raise NotImplementedError

    @staticmethod
    def _extended(t: torch.Tensor, total: int, dim: int) -> torch.Tensor:
        """t with `total` zeros appended along `dim` (0 or 1), in a new contiguous tensor."""
        shape = list(t.shape)
        shape[dim] += total
        ext = torch.zeros(shape, dtype=t.dtype, device=t.device)
        ext.narrow(dim, 0, t.shape[dim]).copy_(t)
        return ext

    def _extend_bias(self, module, total: int) -> None:
        bias = getattr(module, "bias", None)
        if bias is None:
            self.register_buffer("bias", None, persistent=False)
            return
        ext = self._extended(bias.detach(), total, 0)
        self.register_buffer("bias", ext, persistent=False)
        view = ext[:self.out_features]
        module.bias = torch.nn.Parameter(view, requires_grad=bias.requires_grad) \
            if isinstance(bias, torch.nn.Parameter) else view


class LinearRows(AppendedRows):
    """A plain Linear's weight as [W; A] (see AppendedRows)."""

    def __init__(self, linear: torch.nn.Linear, total: int, cols: slice = slice(None)):
        super().__init__()
        w = linear.weight
        self.out_features, self.cols = w.shape[0], cols
        ext = self._extended(w.detach(), total, 0)
        self.register_buffer("weight", ext, persistent=False)
        linear.weight = torch.nn.Parameter(ext[:self.out_features], requires_grad=w.requires_grad)
        self._extend_bias(linear, total)

    @staticmethod
    def reason(linear) -> str | None:
        """None when `linear` can take appended rows, else why not."""
        if not isinstance(linear, torch.nn.Linear):
            return f"a {type(linear).__name__}"
        w = linear.weight
        if type(w.detach()) is not torch.Tensor:
            return f"its weight is a {type(w.detach()).__name__}"
        if not w.is_contiguous():
            return "its weight is not contiguous"
        return None

    def refresh(self, a: torch.Tensor, start: int, stop: int) -> None:
        o = self.out_features
        self.weight[o + start:o + stop].copy_(a[start:stop, self.cols])

    def put(self, r0: int, t, writes) -> None:
        o = self.out_features
        writes.copy(self.weight[o + r0:o + r0 + t.a.shape[0]], t.a[:, self.cols])

    @property
    def extra_nbytes(self) -> int:
        rows = self.weight[self.out_features:]
        return rows.numel() * rows.element_size() + self.bias_nbytes

    def forward(self, base, x: torch.Tensor, n: int) -> torch.Tensor:
        end = self.out_features + n
        return F.linear(x, self.weight[:end], None if self.bias is None else self.bias[:end])

    def halves(self, a: torch.Tensor, m: torch.Tensor, n: int) -> torch.Tensor:
        """A single block's proj_out on its two input halves (project_halves' column views of the weight, over the
        appended rows too)."""
        end, k = self.out_features + n, a.shape[-1]
        w = self.weight[:end]
        return F.linear(a, w[:, :k]) + F.linear(m, w[:, k:], None if self.bias is None else self.bias[:end])


class ScaledRows(AppendedRows):
    """An fp8 linear's (Fp8Linear, GeluFp8Linear) fp8 weight as [W; A] with A quantised to e4m3 per row, its row
    scales appended to the weight's (see AppendedRows). Its input is quantised by the module's own code (or arrives
    quantised: Fp8Rows), so the appended rows see exactly the fp8 rows the base GEMM sees."""

    def __init__(self, linear: Fp8Linear, total: int, cols: slice = slice(None)):
        super().__init__()
        self.out_features, self.cols = linear.out_features, cols
        ext = self._extended(linear.weight_t.t(), total, 0)  # (out + total, in) row-major fp8
        scale = self._extended(linear.weight_scale, total, 1)  # (1, out + total) fp32
        self.register_buffer("weight", ext, persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        linear.weight_t = ext[:self.out_features].t()
        linear.weight_scale = scale[:, :self.out_features]
        self._extend_bias(linear, total)
        # The bias of each adapter count as a whole buffer, not a slice of the extended one: inductor's _scaled_mm
        # template unsqueezes the bias through a view whose size check reads a slice's underlying buffer, and fails
        # (seen on an H100 with torch 2.11). The values never change (the appended entries are zeros).
        self._rows = total // SLOTS
        self._biases: list[torch.Tensor | None] = [None] * (SLOTS + 1)  # by adapter count k; [0] unused
        if self.bias is not None:
            for k in range(1, SLOTS + 1):
                self.register_buffer(f"bias_{k}", self.bias[:self.out_features + k * self._rows].clone(),
                                     persistent=False)
                self._biases[k] = getattr(self, f"bias_{k}")

    @staticmethod
    def reason(linear) -> str | None:
        if not isinstance(linear, Fp8Linear):
            return f"a {type(linear).__name__}"
        wt = linear.weight_t
        if wt.stride() != (1, wt.shape[0]) or tuple(linear.weight_scale.shape) != (1, linear.out_features):
            return "its fp8 weight is not row-major with one scale per row"
        return None

    @torch.no_grad()
    def refresh(self, a: torch.Tensor, start: int, stop: int) -> None:
        writes = SlotWrites()
        self._store(start, *quantize_rows(a[start:stop, self.cols]), writes)
        writes.run()

    @torch.no_grad()
    def put(self, r0: int, t, writes) -> None:
        key = (self.cols.start, self.cols.stop)
        if key not in t.fp8:  # once per loaded adapter and column block: a switch then only copies
            t.fp8[key] = quantize_rows(t.a[:, self.cols])
        self._store(r0, *t.fp8[key], writes)

    def _store(self, r0: int, q: torch.Tensor, s: torch.Tensor, writes: SlotWrites) -> None:
        o, r = self.out_features, q.shape[0]
        writes.copy(self.weight[o + r0:o + r0 + r], q)
        writes.copy(self.weight_scale[0, o + r0:o + r0 + r], s.reshape(-1))

    @property
    def extra_nbytes(self) -> int:
        total = self.weight.shape[0] - self.out_features
        per_count = sum(b.numel() * b.element_size() for b in self._biases if b is not None)
        return total * (self.weight.shape[1] * self.weight.element_size() + self.weight_scale.element_size()) \
            + self.bias_nbytes + per_count

    def forward(self, base: Fp8Linear, x, n: int) -> torch.Tensor:
        end = self.out_features + n
        q, s, lead, dtype = base.input_rows(x)
        bias = self._biases[n // self._rows]  # n = k * rows, k >= 1 (k = 0 runs the base module's own code)
        y = torch._scaled_mm(q, self.weight[:end].t(), scale_a=s, scale_b=self.weight_scale[:, :end],
                             bias=bias, out_dtype=dtype, use_fast_accum=base.use_fast_accum)
        return y.reshape(*lead, end)


def append_rows(module, total: int, cols: slice = slice(None)) -> tuple[AppendedRows | None, str | None]:
    """The appended rows for `module` (a plain Linear or an fp8 linear), or None and why it cannot take them."""
    for kind in (ScaledRows, LinearRows):
        if kind.reason(module) is None:
            return kind(module, total, cols), None
    return None, f"{type(module).__name__}: " + "; ".join(r for r in (ScaledRows.reason(module),
                                                                       LinearRows.reason(module)) if r)
