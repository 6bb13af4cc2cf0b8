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
same count changes only buffer contents (the slot's, and the rows appended under the weights: fused_rows.py), so it
compiles nothing and replays the same CUDA graphs.

The data flow with k > 0: by default the fused branch of fused_rows.py (the adapters' down-projection rows appended
under each weight, the up-projection added in place) on every module that can take it; with
`FLUX_LORA_FUSED_BRANCH=0` the side branch everywhere.

The side branch (`FLUX_LORA_FUSED_BRANCH=0`, and the modules that cannot take the fused one): two thin GEMMs
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

from kontext_server.lora.batched_writes import SlotWrites
from kontext_server.lora.fused_rows import (AppendedRows, LinearRows, ScaledRows, append_rows,  # noqa: F401
                                            lora_up_add_)
from kontext_server.request import MAX_LORAS_PER_REQUEST
from optimizations.fp8.linear import Fp8Rows
from optimizations.fusions.split_proj_out import SplitProjOut, project_halves

SLOTS = MAX_LORAS_PER_REQUEST
ROW_ALIGN = 16  # rows per adapter are a multiple of this (see the module docstring)

# Modules the model fuses into one (qkv_fusion): their update goes into the fused module's slot, one part each.
FUSED_GROUPS = {"to_q": ("to_qkv", 0), "to_k": ("to_qkv", 1), "to_v": ("to_qkv", 2),
                "add_q_proj": ("to_added_qkv", 0), "add_k_proj": ("to_added_qkv", 1),
                "add_v_proj": ("to_added_qkv", 2)}


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
    def write(self, i: int, targets: dict, scale: float, weights: bool = True,
              writes: SlotWrites | None = None) -> None:
        """Put adapter `targets` (module name -> DeviceTarget) in slot i at `scale` (with `writes`, the scale comes
        with their `run`: recorded writes are issued again at other scales); weights=False: the scale only
        (B's columns are rewritten: B holds the scaled up-projection; A and its mirrors are kept). A's rows that the
        adapter does not fill keep what they held: their B columns are zero. A few small copies per part, and for
        each mirror one or two more (the fp8 rows are quantised once per loaded adapter, not per switch). `writes`:
        where to record them, for the caller to issue with every other slot's (a switch is host-bound); without it
        they are issued here."""
        own = writes is None
        writes = SlotWrites() if own else writes
        r_start, r_stop = i * self.rows, (i + 1) * self.rows
        writes.zero(self.B[:, r_start:r_stop])  # block-diagonal: each part's columns feed only its own outputs
        for p, (module, out_offset, out_size) in enumerate(self.parts):
            t = targets.get(module)
            if t is None:
                continue
            r0 = r_start + p * self.rank
            r = t.a.shape[0]
            if weights:
                writes.copy(self.A[r0:r0 + r], t.a)
                for m in self.mirrors:
                    m.put(r0, t, writes)
            writes.scaled_copy(self.B[out_offset:out_offset + out_size, r0:r0 + r], t.b, i, t.scale)
        if own:
            writes.run({i: scale})


# ---- the rows appended under a module's weight (the fused branch) ------------------------------------------------
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


# ---- where a module name lands in a transformer variant --------------------------------------------------------------
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
