"""LoRA slots: fixed-shape device buffers beside each targeted module, shared by every transformer variant.

Why not diffusers' PEFT injection + `enable_lora_hotswap`: our transformer's linears are fused (QKV), replaced (fp8
plain modules, the modulation table) or rewritten (the split proj_out), which PEFT cannot target, and hotswap holds
one adapter at a time; fixed-shape slots give several adapters per request with no recompile and no new CUDA-graph
capture.

The mechanism. For each module some adapter of the library targets, one `LoraSlot` holds
    A (S*P*R, in), B (out, S*P*R), scale (S*P*R,)
with S = 3 adapters per request, R the slots' rank (the largest in the library, or --lora-max-rank) and P the number
of the model's modules fused into this one (3 for to_qkv / to_added_qkv, else 1). Adapter i of a request owns rows
[i*P*R, (i+1)*P*R); within them part p (to_q, to_k, to_v) owns R rows, its rank-r update in the first r of them, and
B is block-diagonal over the parts (to_q's columns feed only to_q's outputs). A row's scale is the request's scale
times alpha / rank (PEFT's scaling); unused rows have scale 0, so whatever they hold adds exact zeros. The module
then computes
    base(x) + ((x A[:n]^T) * scale[:n]) B[:, :n]^T,   n = k*P*R,
k being the request's adapter count, a plain int attribute of the slot. k = 0 runs exactly the base module's code (no
extra op: a request without adapters is bit-identical to a server without adapters). Under torch.compile, k is a
constant of the traced code guarded by dynamo: each k compiles once per shape, and a switch between adapters of the
same count changes only buffer contents, so it compiles nothing and replays the same CUDA graphs.

Where the branch takes its input, per kind of module (each transformer variant gets its own wrapper around its own
module, all reading the one slot):
- a Linear or an fp8 linear (`LoraLinear`): the module's input. In the fp8 copy that input may be fp8 rows quantised
  by the fused norm or attention-output kernel (Fp8Rows): the branch then sees them dequantised, i.e. the
  fp8-rounded activation, not the bf16 one (the fidelity figures of tools/bench_lora.py include this);
- an fp8 linear whose input is the pre-GELU activation (GeluFp8Linear, GELU fused into its quantisation): GELU(x),
  recomputed for the branch;
- a linear whose GELU is applied in the same call (the exact tier's cuBLASLt GELU epilogue): with k > 0, the linear,
  plus the branch, then the GELU (`LoraGeluOutput`: the epilogue cannot take a per-row update); k = 0 keeps it;
- a single block's proj_out, split into two GEMMs on the attention and MLP halves of its input (bf16 views or fp8
  halves): the branch takes both halves, A split by columns (`LoraProjOut`), so the concatenation is still never
  built;
- an AdaLN modulation linear replaced by the modulation table: the table's fill adds the branch (`table_branch`, a
  hook on ModulationLinear); the manager resets the table whenever the active adapters change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kontext_server.request import MAX_LORAS_PER_REQUEST
from optimizations.fp8.linear import Fp8Rows
from optimizations.fusions.split_proj_out import SplitProjOut, project_halves

SLOTS = MAX_LORAS_PER_REQUEST

# Modules the model fuses into one (qkv_fusion): their update goes into the fused module's slot, one part each.
FUSED_GROUPS = {"to_q": ("to_qkv", 0), "to_k": ("to_qkv", 1), "to_v": ("to_qkv", 2),
                "add_q_proj": ("to_added_qkv", 0), "add_k_proj": ("to_added_qkv", 1),
                "add_v_proj": ("to_added_qkv", 2)}


class LoraSlot(torch.nn.Module):
    """The buffers of one targeted module (see the module docstring). `k`: adapters active, 0 between requests."""

    def __init__(self, name: str, parts: list[tuple[str, int, int]], in_features: int, out_features: int, rank: int,
                 in_split: int | None, dtype: torch.dtype, device):
        super().__init__()
        self.name, self.parts, self.rank, self.in_split = name, parts, rank, in_split
        self.in_features, self.out_features = in_features, out_features
        self.rows = len(parts) * rank  # rows per adapter
        total = SLOTS * self.rows
        self.register_buffer("A", torch.zeros(total, in_features, dtype=dtype, device=device), persistent=False)
        self.register_buffer("B", torch.zeros(out_features, total, dtype=dtype, device=device), persistent=False)
        self.register_buffer("scale", torch.zeros(total, dtype=dtype, device=device), persistent=False)
        self.k = 0

    def extra_repr(self) -> str:
        return f"{self.name}: {len(self.parts)} part(s) x rank {self.rank} x {SLOTS} slots"

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        n = self.k * self.rows
        h = F.linear(x, self.A[:n]) * self.scale[:n]
        return F.linear(h, self.B[:, :n])

    def delta_halves(self, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        n, s = self.k * self.rows, self.in_split
        h = (F.linear(a, self.A[:n, :s]) + F.linear(m, self.A[:n, s:])) * self.scale[:n]
        return F.linear(h, self.B[:, :n])

    def table_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The modulation table's hook: the branch while adapters are active, zeros otherwise (never called with
        k = 0: the manager clears the hook then)."""
        return self.delta(x)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.B, self.scale))

    # ---- writing adapters (worker thread, between requests) ---------------------------------------------------------
    @torch.no_grad()
    def write(self, i: int, targets: dict, scale: float, weights: bool = True) -> None:
        """Put adapter `targets` (module name -> DeviceTarget) in slot i at `scale`; weights=False: scales only."""
        rows = slice(i * self.rows, (i + 1) * self.rows)
        self.scale[rows].zero_()
        for p, (module, out_offset, out_size) in enumerate(self.parts):
            t = targets.get(module)
            if t is None:
                continue
            r0 = i * self.rows + p * self.rank
            r = t.a.shape[0]
            if weights:
                self.A[r0:r0 + r].copy_(t.a)
                self.B[:, r0:r0 + r].zero_()  # block-diagonal: this part's columns feed only its own outputs
                self.B[out_offset:out_offset + out_size, r0:r0 + r].copy_(t.b)
            self.scale[r0:r0 + r].fill_(scale * t.scale)


def _dense(x, dtype: torch.dtype) -> torch.Tensor:
    """The branch's input: fp8 rows (quantised by the kernel that produced them) dequantised; a tensor as it is."""
    if isinstance(x, Fp8Rows):
        return (x.data.float() * x.scale).to(dtype)
    return x.to(dtype)


class LoraLinear(torch.nn.Module):
    """A linear-like module (Linear, Fp8Linear, GeluFp8Linear) plus its slot's branch."""

    def __init__(self, base: torch.nn.Module, slot: LoraSlot, pre_gelu: bool = False):
        super().__init__()
        self.base, self.slot, self.pre_gelu = base, slot, pre_gelu

    def forward(self, x):
        out = self.base(x)
        if self.slot.k == 0:
            return out
        xb = _dense(x, self.slot.A.dtype)
        if self.pre_gelu:  # GeluFp8Linear takes the pre-GELU activation and applies the GELU in its quantisation
            xb = F.gelu(xb, approximate="tanh")
        return out + self.slot.delta(xb).to(out.dtype)


class LoraGeluOutput(torch.nn.Module):
    """A module that computes gelu_tanh(linear(x)) in one call (the exact tier's GELU epilogue): with adapters active,
    gelu_tanh(linear(x) + branch(x)), the order of diffusers' modules; without, the module itself."""

    def __init__(self, base: torch.nn.Module, slot: LoraSlot, via_proj: bool):
        super().__init__()
        self.base, self.slot, self.via_proj = base, slot, via_proj

    def forward(self, x):
        if self.slot.k == 0:
            return self.base(x)
        linear = self.base.proj if self.via_proj else self.base
        y = F.linear(x, linear.weight, linear.bias)
        return F.gelu(y + self.slot.delta(x.to(self.slot.A.dtype)).to(y.dtype), approximate="tanh")


class LoraProjOut(torch.nn.Module):
    """A single block's proj_out (a Linear, or split into two halves) plus its slot's branch. Called on the
    concatenation (x) or on its two halves (attn_output, mlp_output), as the block's forward calls it."""

    def __init__(self, base: torch.nn.Module, slot: LoraSlot):
        super().__init__()
        self.base, self.slot = base, slot
        mlp = getattr(base, "mlp", None)
        self.mlp_pre_gelu = type(mlp).__name__ == "GeluFp8Linear"  # its input is the pre-GELU activation

    def forward(self, attn_output, mlp_output=None):
        if mlp_output is None:
            out = self.base(attn_output)
            if self.slot.k == 0:
                return out
            return out + self.slot.delta(_dense(attn_output, self.slot.A.dtype)).to(out.dtype)
        out = project_halves(self.base, attn_output, mlp_output)
        if self.slot.k == 0:
            return out
        dtype = self.slot.A.dtype
        m = _dense(mlp_output, dtype)
        if self.mlp_pre_gelu:
            m = F.gelu(m, approximate="tanh")
        return out + self.slot.delta_halves(_dense(attn_output, dtype), m).to(out.dtype)


WRAPPERS = (LoraLinear, LoraGeluOutput, LoraProjOut)


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


def wrap(variant: torch.nn.Module, placement: Placement, slot: LoraSlot) -> None:
    """Put the slot's branch on the placement's module of `variant` (idempotent)."""
    owner_path, _, child = placement.path.rpartition(".")
    owner = variant.get_submodule(owner_path) if owner_path else variant
    current = owner._modules[child]
    if isinstance(current, WRAPPERS):
        if current.slot is not slot:
            raise RuntimeError(f"{placement.path} already carries another LoRA slot")
        return
    if placement.kind == "table":
        current.table_branch = None  # set by the manager while adapters are active
        return
    if placement.kind in ("linear", "pre_gelu"):
        wrapper = LoraLinear(current, slot, pre_gelu=placement.kind == "pre_gelu")
    elif placement.kind in ("gelu_out", "gelu_out_proj"):
        wrapper = LoraGeluOutput(current, slot, via_proj=placement.kind == "gelu_out_proj")
    else:
        wrapper = LoraProjOut(current, slot)
    setattr(owner, child, wrapper)


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
