"""LoRA slots: fixed-shape device buffers beside each targeted module, shared by every transformer variant.

Why not diffusers' PEFT injection + `enable_lora_hotswap`: our transformer's linears are fused (QKV), replaced (fp8
plain modules, the modulation table) or rewritten (the split proj_out), which PEFT cannot target, and hotswap holds
one adapter at a time; fixed-shape slots give several adapters per request with no recompile and no new CUDA-graph
capture.

The buffers. For each module some adapter of the library targets, one `LoraSlot` holds
    A (S*Q, in), B (out, S*Q)
with S = 3 adapters per request, R the slots' rank (the largest in the library, or --lora-max-rank), P the number of
the model's modules fused into this one (3 for to_qkv / to_added_qkv, else 1) and Q = P*R rounded up to a multiple
of 16 (ROW_ALIGN: fp8 GEMMs need every dimension so, and aligned rows keep the bf16 GEMMs on their fast kernels).
Adapter i of a request owns rows [i*Q, (i+1)*Q); within them part p (to_q, to_k, to_v) owns R rows, its rank-r
update in the first r of them, and B is block-diagonal over the parts (to_q's columns feed only to_q's outputs).
B holds the up-projection times its row's scale (the request's scale times alpha / rank: PEFT's scaling), so a
column no adapter uses is zero and adds exact zeros. The module computes
    base(x) + (x A[:n]^T) B[:, :n]^T,   n = k*Q,
k being the request's adapter count, a plain int attribute of the slot. k = 0 runs exactly the base module's code (no
extra op: a request without adapters is bit-identical to a server without adapters). Under torch.compile, k is a
constant of the traced code guarded by dynamo: each k compiles once per shape, and a switch between adapters of the
same count changes only buffer contents (the slot's, and the rows appended under the weights below), so it compiles
nothing and replays the same CUDA graphs.

The data flow with k > 0: the fused branch (opt-in, `FLUX_LORA_FUSED_BRANCH=1`: tested on CPU; on CUDA the fp8
copy's compiled GEMM with appended rows failed inductor's lowering of `_scaled_mm`, so the side branch is the default).
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
  (`LoraGeluOutput`). What cannot, keeps the side branch below: the modulation table (its fill runs once per request
  on one conditioning vector, not per token: nothing to save) and any weight that is not a plain tensor (torchao's
  subclasses, with FLUX_FP8_PLAIN_LINEARS=0 or MXFP4).
- What is left: the up-projection's pass over each output (C read and written once by the beta = 1 GEMM, where the
  side branch wrote its update and read it again in the add), and the GELU pass of the exact tier's GELU-epilogue
  linears. Removing those would take the update into the base GEMM's own main loop, or into each consumer's kernel.

The side branch (the default, and the modules above that cannot take the fused one): two thin GEMMs
beside the base module's, base(x) + (x A[:n]^T) B[:, :n]^T, each reading the layer input again and writing its
update, then added in another pass. Where it takes its input, per kind of module:
- a Linear or an fp8 linear (`LoraLinear`): the module's input. In the fp8 copy that input may be fp8 rows quantised
  by the fused norm or attention-output kernel (Fp8Rows): the branch then sees them dequantised, i.e. the
  fp8-rounded activation, not the bf16 one;
- an fp8 linear whose input is the pre-GELU activation (GeluFp8Linear, GELU fused into its quantisation): GELU(x),
  recomputed for the branch;
- a linear whose GELU is applied in the same call (the exact tier's cuBLASLt GELU epilogue): with k > 0, the linear,
  plus the branch, then the GELU (`LoraGeluOutput`: the epilogue cannot take the update); k = 0 keeps it;
- a single block's proj_out, split into two GEMMs on the attention and MLP halves of its input (bf16 views or fp8
  halves): the branch takes both halves, A split by columns (`LoraProjOut`), so the concatenation is still never
  built;
- an AdaLN modulation linear replaced by the modulation table: the table's fill adds the branch (`table_branch`, a
  hook on ModulationLinear); the manager resets the table whenever the active adapters change.
`slot.fused` picks the branch of the modules that have appended rows (the manager sets it for a request, so one
server can time both: tools/bench_lora.py); the request's graph key carries it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kontext_server.request import MAX_LORAS_PER_REQUEST
from optimizations.fp8.linear import Fp8Linear, Fp8Rows, quantize_rows
from optimizations.fusions.split_proj_out import SplitProjOut, project_halves

SLOTS = MAX_LORAS_PER_REQUEST
ROW_ALIGN = 16  # rows per adapter are a multiple of this (see the module docstring)

# Modules the model fuses into one (qkv_fusion): their update goes into the fused module's slot, one part each.
FUSED_GROUPS = {"to_q": ("to_qkv", 0), "to_k": ("to_qkv", 1), "to_v": ("to_qkv", 2),
                "add_q_proj": ("to_added_qkv", 0), "add_k_proj": ("to_added_qkv", 1),
                "add_v_proj": ("to_added_qkv", 2)}


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


class LoraSlot(torch.nn.Module):
    """The buffers of one targeted module (see the module docstring). `k`: adapters active, 0 between requests;
    `fused`: whether modules with appended rows run the fused branch (True) or the side branch."""

    def __init__(self, name: str, parts: list[tuple[str, int, int]], in_features: int, out_features: int, rank: int,
                 in_split: int | None, dtype: torch.dtype, device):
        super().__init__()
        self.name, self.parts, self.rank, self.in_split = name, parts, rank, in_split
        self.in_features, self.out_features = in_features, out_features
        self.rows = -(-len(parts) * rank // ROW_ALIGN) * ROW_ALIGN  # rows per adapter
        total = SLOTS * self.rows
        self.register_buffer("A", torch.zeros(total, in_features, dtype=dtype, device=device), persistent=False)
        self.register_buffer("B", torch.zeros(out_features, total, dtype=dtype, device=device), persistent=False)
        self.k = 0
        self.fused = True
        # Appended rows (AppendedRows modules) that hold a copy of A's rows (or of a column block of them): refilled
        # by write(). A plain list, not submodules: the wrappers own them. `home`: the one whose rows ARE self.A.
        self.mirrors: list = []
        self.home = None

    def extra_repr(self) -> str:
        return f"{self.name}: {len(self.parts)} part(s) x rank {self.rank} x {SLOTS} slots"

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The side branch on input x."""
        n = self.k * self.rows
        return F.linear(F.linear(x, self.A[:n]), self.B[:, :n])

    def delta_halves(self, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The side branch on the two halves of a split proj_out's input."""
        n, s = self.k * self.rows, self.in_split
        return F.linear(F.linear(a, self.A[:n, :s]) + F.linear(m, self.A[:n, s:]), self.B[:, :n])

    def table_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The modulation table's hook: the branch while adapters are active, zeros otherwise (never called with
        k = 0: the manager clears the hook then)."""
        return self.delta(x)

    def attach(self, rows: "AppendedRows") -> None:
        """Fill the rows appended under a module's weight (made for this slot) and keep them filled: the first
        full-width rows of the slot's dtype become the slot's A itself (no copy); others are mirrors."""
        if self.home is None and rows.cols == slice(None) and rows.weight.dtype == self.A.dtype:
            rows.weight[rows.out_features:].copy_(self.A)
            self.A = rows.weight[rows.out_features:]  # the registered buffer, now a view of W_ext
            self.home = rows
        else:
            rows.refresh(self.A, 0, self.A.shape[0])
            self.mirrors.append(rows)

    @property
    def nbytes(self) -> int:
        """A and B, the mirrors' own rows (A's home rows are A) and the zeros appended to biases."""
        own = sum(t.numel() * t.element_size() for t in (self.A, self.B))
        return own + sum(m.extra_nbytes for m in self.mirrors) + (self.home.bias_nbytes if self.home else 0)

    # ---- writing adapters (worker thread, between requests) ---------------------------------------------------------
    @torch.no_grad()
    def write(self, i: int, targets: dict, scale: float, weights: bool = True) -> None:
        """Put adapter `targets` (module name -> DeviceTarget) in slot i at `scale`; weights=False: the scale only
        (B's columns are rewritten: B holds the scaled up-projection; A and its mirrors are kept). A's rows that the
        adapter does not fill keep what they held: their B columns are zero. A few small copies per part, and for
        each mirror one or two more (the fp8 rows are quantised once per loaded adapter, not per switch): a switch
        is host-bound, one launch per op."""
        r_start, r_stop = i * self.rows, (i + 1) * self.rows
        self.B[:, r_start:r_stop].zero_()  # block-diagonal: each part's columns feed only its own outputs
        for p, (module, out_offset, out_size) in enumerate(self.parts):
            t = targets.get(module)
            if t is None:
                continue
            r0 = r_start + p * self.rank
            r = t.a.shape[0]
            if weights:
                self.A[r0:r0 + r].copy_(t.a)
                for m in self.mirrors:
                    m.put(r0, t)
            torch.mul(t.b, scale * t.scale, out=self.B[out_offset:out_offset + out_size, r0:r0 + r])


# ---- the rows appended under a module's weight (the fused branch) ------------------------------------------------
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

    def put(self, r0: int, t) -> None:
        """One adapter target's rows (a DeviceTarget's `a`, or its column block) at slot row r0 (at a write)."""
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

    def put(self, r0: int, t) -> None:
        o = self.out_features
        self.weight[o + r0:o + r0 + t.a.shape[0]].copy_(t.a[:, self.cols])

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
        self._biases: list[torch.Tensor | None] = [None] * (SLOTS + 1)
        if self.bias is not None:
            for k in range(1, SLOTS + 1):
                self.register_buffer(f"bias_{k}", self.bias[:self.out_features + k * total // SLOTS].clone(),
                                     persistent=False)
                self._biases[k] = getattr(self, f"bias_{k}")
        self._rows = total // SLOTS

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
        self._store(start, *quantize_rows(a[start:stop, self.cols]))

    @torch.no_grad()
    def put(self, r0: int, t) -> None:
        key = (self.cols.start, self.cols.stop)
        if key not in t.fp8:  # once per loaded adapter and column block: a switch then only copies
            t.fp8[key] = quantize_rows(t.a[:, self.cols])
        self._store(r0, *t.fp8[key])

    def _store(self, r0: int, q: torch.Tensor, s: torch.Tensor) -> None:
        o, r = self.out_features, q.shape[0]
        self.weight[o + r0:o + r0 + r].copy_(q)
        self.weight_scale[0, o + r0:o + r0 + r].copy_(s.reshape(-1))

    @property
    def extra_nbytes(self) -> int:
        total = self.weight.shape[0] - self.out_features
        per_count = sum(b.numel() * b.element_size() for b in self._biases if b is not None)
        return total * (self.weight.shape[1] * self.weight.element_size() + self.weight_scale.element_size()) \
            + self.bias_nbytes + per_count

    def forward(self, base: Fp8Linear, x, n: int) -> torch.Tensor:
        end = self.out_features + n
        q, s, lead, dtype = base.input_rows(x)
        k, rest = divmod(n, self._rows)
        bias = self._biases[k] if self.bias is not None and rest == 0 and 1 <= k <= SLOTS else \
            None if self.bias is None else self.bias[:end]
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


# ---- the wrappers ------------------------------------------------------------------------------------------------
def _dense(x, dtype: torch.dtype) -> torch.Tensor:
    """The side branch's input: fp8 rows (quantised by the kernel that produced them) dequantised; a tensor as it
    is."""
    if isinstance(x, Fp8Rows):
        return (x.data.float() * x.scale).to(dtype)
    return x.to(dtype)


class LoraLinear(torch.nn.Module):
    """A linear-like module (Linear, Fp8Linear, GeluFp8Linear) plus its slot's branch: fused (`appended`, the
    weight's appended rows) where the module can take it, else the side branch. `fuse=False`: the side branch only."""

    def __init__(self, base: torch.nn.Module, slot: LoraSlot, pre_gelu: bool = False, fuse: bool = True):
        super().__init__()
        self.base, self.slot, self.pre_gelu = base, slot, pre_gelu
        self.appended, self.unfused_reason = append_rows(base, slot.A.shape[0]) if fuse else (None, "off")
        if self.appended is not None:
            slot.attach(self.appended)

    def forward(self, x):
        if self.slot.k == 0:
            return self.base(x)
        if self.appended is not None and self.slot.fused:
            y = self.appended(self.base, x, self.slot.k * self.slot.rows)
            lora_up_add_(y, self.slot.B)
            return y[..., :self.appended.out_features]
        out = self.base(x)
        xb = _dense(x, self.slot.A.dtype)
        if self.pre_gelu:  # GeluFp8Linear takes the pre-GELU activation and applies the GELU in its quantisation
            xb = F.gelu(xb, approximate="tanh")
        return out + self.slot.delta(xb).to(out.dtype)


class LoraGeluOutput(torch.nn.Module):
    """A module that computes gelu_tanh(linear(x)) in one call (the exact tier's GELU epilogue): with adapters active,
    gelu_tanh(linear(x) + branch(x)), the order of diffusers' modules; without, the module itself. With adapters the
    linear runs without its epilogue on either branch (the epilogue would apply the GELU to the appended columns too,
    and before the update is added), then the GELU is a pass of its own: the fused branch saves the second read of
    the input and the thin down-projection GEMM, not the GELU's pass."""

    def __init__(self, base: torch.nn.Module, slot: LoraSlot, via_proj: bool, fuse: bool = True):
        super().__init__()
        self.base, self.slot, self.via_proj = base, slot, via_proj
        linear = base.proj if via_proj else base
        self.appended, self.unfused_reason = append_rows(linear, slot.A.shape[0]) if fuse else (None, "off")
        if self.appended is not None:
            slot.attach(self.appended)

    def forward(self, x):
        if self.slot.k == 0:
            return self.base(x)
        linear = self.base.proj if self.via_proj else self.base
        if self.appended is not None and self.slot.fused:
            y = self.appended(linear, x, self.slot.k * self.slot.rows)
            lora_up_add_(y, self.slot.B)
            return F.gelu(y[..., :self.appended.out_features], approximate="tanh")
        y = F.linear(x, linear.weight, linear.bias)
        return F.gelu(y + self.slot.delta(x.to(self.slot.A.dtype)).to(y.dtype), approximate="tanh")


class LoraProjOut(torch.nn.Module):
    """A single block's proj_out (a Linear, or split into two halves) plus its slot's branch. Called on the
    concatenation (x) or on its two halves (attn_output, mlp_output), as the block's forward calls it. Fused: a
    Linear's appended rows (column views for the halves), or each half of a SplitProjOut with its own column block
    of A appended; the halves' sum then carries [base | x A^T]."""

    def __init__(self, base: torch.nn.Module, slot: LoraSlot, fuse: bool = True):
        super().__init__()
        self.base, self.slot = base, slot
        mlp = getattr(base, "mlp", None)
        self.mlp_pre_gelu = type(mlp).__name__ == "GeluFp8Linear"  # its input is the pre-GELU activation
        self.appended = self.appended_attn = self.appended_mlp = None
        self.unfused_reason = "off"
        if fuse:
            self._append(base, slot)
        for r in (self.appended, self.appended_attn, self.appended_mlp):
            if r is not None:
                slot.attach(r)

    def _append(self, base, slot: LoraSlot) -> None:
        total, s = slot.A.shape[0], slot.in_split
        if isinstance(base, SplitProjOut):
            reasons = [ScaledRows.reason(h) and LinearRows.reason(h) for h in (base.attn, base.mlp)]
            if any(reasons):  # both halves, or neither
                self.unfused_reason = "; ".join(r for r in reasons if r)
                return
            self.appended_attn, _ = append_rows(base.attn, total, slice(0, s))
            self.appended_mlp, _ = append_rows(base.mlp, total, slice(s, None))
            self.unfused_reason = None
        else:
            self.appended, self.unfused_reason = append_rows(base, total)

    @property
    def fusable(self) -> bool:
        return self.appended is not None or self.appended_attn is not None

    def forward(self, attn_output, mlp_output=None):
        slot = self.slot
        if slot.k == 0:
            return self.base(attn_output) if mlp_output is None else project_halves(self.base, attn_output,
                                                                                     mlp_output)
        n = slot.k * slot.rows
        if slot.fused and self.fusable:
            if mlp_output is None:
                y = self.appended(self.base, attn_output, n)
            elif self.appended is not None:
                y = self.appended.halves(attn_output, mlp_output, n)
            else:
                y = self.appended_attn(self.base.attn, attn_output, n) \
                    + self.appended_mlp(self.base.mlp, mlp_output, n)
            lora_up_add_(y, slot.B)
            return y[..., :slot.out_features]
        if mlp_output is None:
            out = self.base(attn_output)
            return out + slot.delta(_dense(attn_output, slot.A.dtype)).to(out.dtype)
        out = project_halves(self.base, attn_output, mlp_output)
        dtype = slot.A.dtype
        m = _dense(mlp_output, dtype)
        if self.mlp_pre_gelu:
            m = F.gelu(m, approximate="tanh")
        return out + slot.delta_halves(_dense(attn_output, dtype), m).to(out.dtype)


WRAPPERS = (LoraLinear, LoraGeluOutput, LoraProjOut)


def is_fused(wrapper) -> bool:
    """Whether a wrapper runs the fused branch when its slot's `fused` is set."""
    if isinstance(wrapper, LoraProjOut):
        return wrapper.fusable
    return getattr(wrapper, "appended", None) is not None


# ---- where a module name lands in a transformer variant ----------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    group: str  # the slot's name: the module that computes it in the optimised model (e.g. ...attn.to_qkv)
    part: int
    parts: int
    path: str  # the module to wrap (or to hook, for the modulation table)
    kind: str  # linear | pre_gelu | gelu_out | gelu_out_proj | proj_out | table


def _get(root: torch.nn.Module, path: str):
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _linear_shape(m) -> tuple[int, int] | None:
    if isinstance(m, SplitProjOut):
        return m.attn.in_features + m.mlp.in_features, m.attn.out_features
    if hasattr(m, "in_features") and hasattr(m, "out_features"):
        return int(m.in_features), int(m.out_features)
    return None


def _has_instance_forward(m, func_name: str) -> bool:
    fwd = m.__dict__.get("forward")
    return getattr(getattr(fwd, "__func__", None), "__qualname__", "") == func_name


def place(variant: torch.nn.Module, module: str) -> Placement:
    """Where the update of the loaded model's linear `module` goes in `variant` (its optimisations applied)."""
    from optimizations.modulation_table import ModulationLinear

    parent, _, leaf = module.rpartition(".")
    if leaf in FUSED_GROUPS:
        fused, part = FUSED_GROUPS[leaf]
        attn = _get(variant, parent)
        if attn is not None and getattr(attn, "fused_projections", False) and fused in attn._modules:
            group = f"{parent}.{fused}"
            return Placement(group, part, 3, group, "linear")
    m = _get(variant, module)
    if m is None and module.endswith(".net.0.proj"):  # fp8: the GELU moved into net.2, net.0 is the linear itself
        path = module.removesuffix(".proj")
        if _linear_shape(_get(variant, path)) is not None:
            return Placement(module, 0, 1, path, "linear")
    if m is None:
        raise LookupError(f"{module} is not in the optimised model")
    if isinstance(m, ModulationLinear):
        return Placement(module, 0, 1, module, "table")
    if module.endswith(".net.0.proj"):
        gelu = _get(variant, parent)
        if _has_instance_forward(gelu, "_ff_input_forward"):  # the exact tier's GELU epilogue
            return Placement(module, 0, 1, parent, "gelu_out_proj")
    if _has_instance_forward(m, "_linear_with_gelu_forward"):
        return Placement(module, 0, 1, module, "gelu_out")
    if leaf == "proj_out" and parent.startswith("single_transformer_blocks."):
        return Placement(module, 0, 1, module, "proj_out")
    if type(m).__name__ == "GeluFp8Linear":
        return Placement(module, 0, 1, module, "pre_gelu")
    if _linear_shape(m) is None:
        raise LookupError(f"{module} is a {type(m).__name__}, which the LoRA slots cannot wrap")
    return Placement(module, 0, 1, module, "linear")


def wrap(variant: torch.nn.Module, placement: Placement, slot: LoraSlot, fuse: bool = True):
    """Put the slot's branch on the placement's module of `variant` (idempotent); returns the wrapper (None for the
    modulation table's hook). `fuse`: append the slot's rows under the module's weight where it can take them."""
    owner_path, _, child = placement.path.rpartition(".")
    owner = variant.get_submodule(owner_path) if owner_path else variant
    current = owner._modules[child]
    if isinstance(current, WRAPPERS):
        if current.slot is not slot:
            raise RuntimeError(f"{placement.path} already carries another LoRA slot")
        return current
    if placement.kind == "table":
        current.table_branch = None  # set by the manager while adapters are active
        return None
    if placement.kind in ("linear", "pre_gelu"):
        wrapper = LoraLinear(current, slot, pre_gelu=placement.kind == "pre_gelu", fuse=fuse)
    elif placement.kind in ("gelu_out", "gelu_out_proj"):
        wrapper = LoraGeluOutput(current, slot, via_proj=placement.kind == "gelu_out_proj", fuse=fuse)
    else:
        wrapper = LoraProjOut(current, slot, fuse=fuse)
    setattr(owner, child, wrapper)
    return wrapper


def shape_of(variant: torch.nn.Module, placement: Placement) -> tuple[int, int]:
    m = variant.get_submodule(placement.path)
    if isinstance(m, WRAPPERS):
        m = m.base
    if placement.kind == "gelu_out_proj":
        m = m.proj
    shape = _linear_shape(m)
    if shape is None:
        raise LookupError(f"{placement.path}: no linear shape")
    return shape
