"""The single blocks without the concatenation before `proj_out` (a rewrite, not a new kernel), in both transformers.

FluxSingleTransformerBlock computes `proj_out(cat([attention_output, gelu(mlp)]))`. Since
W @ [a; m] + b == W_a @ a + (W_m @ m + b), the block can call two GEMMs, one per half of proj_out's input, and never
build the 15,360-wide concatenation. Inductor cannot do this itself: it materialises the concatenation (cuBLAS is an
extern call it cannot fuse into), and splitting proj_out while keeping the concatenation measured slower (it sliced
the materialised buffer).

- fp8 copy (`split_single_block_proj_out`): proj_out becomes a `SplitProjOut` of two linears, each quantised on its
  own. Quantised as one linear, the concatenation needed a row-wise amax over 15,360 features: inductor emitted a
  reduction that recomputes the GELU plus a separate cast kernel (5.6 ms per step at edit-512 on an H200). Split, the
  MLP half's quantisation fuses with its GELU as in the double blocks' feed-forward, and each half gets its own row
  scale (finer, not coarser). Measured: 47.6 -> 46.8 ms per fp8 transformer call at edit-512 (H200, one session).
- bf16 transformer (`install_bf16`, with `compile`): proj_out stays diffusers' Linear and the block multiplies by the
  two column blocks of its weight, as views (cuBLAS reads them with the full row stride; no copy, the same state
  dict). The exact tier's profile at t2i-1024 had the concatenation (with the attention output's transpose folded in)
  as its largest elementwise kernel: 3.4 ms per step of 123 (BENCHMARKS.md, "T5 fixed"). Measured on one H100
  (BENCHMARKS.md, 2026-11-24): -1.8 ms (-1.4%) per exact-tier call at t2i-1024, two interleaved repeats of 40 calls;
  the two GEMMs take the time the one did. Numerics: each half is rounded to bf16 before the sum (float
  reordering, like the other lossless stages; the stage table's fidelity against stage 0 did not change).

The forward below is a copy of diffusers 0.42.1's with that one line changed, so it is applied only on that version
(tests compare it with the original block). `FLUX_FP8_SPLIT_PROJ_OUT=0` / `FLUX_BF16_SPLIT_PROJ_OUT=0` turn it off
for A/B runs.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from optimizations.base import bind_forward, linears_uninitialised
from kontext_server import settings
from optimizations.compiling.cache import switched_off

VERIFIED_DIFFUSERS = "0.42.1"
BF16_ENV = settings.BF16_SPLIT_PROJ_OUT
# Where compile.canonical_single_block_outputs keeps the forward it wraps (an attribute, so a deep copy rebinds it).
_WRAPPED = "_forward_before_canonical_strides"


class SplitProjOut(torch.nn.Module):
    """A single block's proj_out (Linear(dim + mlp_dim -> dim)) as two linears, one per half of its input."""

    def __init__(self, linear: torch.nn.Linear, split: int):
        super().__init__()
        w, b = linear.weight.detach(), linear.bias
        with linears_uninitialised():  # both are copied in below
            self.attn = torch.nn.Linear(split, linear.out_features, bias=False, device=w.device, dtype=w.dtype)
            self.mlp = torch.nn.Linear(linear.in_features - split, linear.out_features, bias=b is not None,
                                       device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.attn.weight.copy_(w[:, :split])
            self.mlp.weight.copy_(w[:, split:])
            if b is not None:
                self.mlp.bias.copy_(b)

    def forward(self, attn_output: torch.Tensor, mlp_output: torch.Tensor) -> torch.Tensor:
        return self.attn(attn_output) + self.mlp(mlp_output)


def project_halves(proj_out: torch.nn.Module, attn_output: torch.Tensor, mlp_output: torch.Tensor) -> torch.Tensor:
    """proj_out(cat([attn_output, mlp_output], -1)) without the concatenation. A module other than a plain Linear
    (a SplitProjOut, or a wrapper around one such as the server's LoRA slots) is called with the two halves."""
    if not isinstance(proj_out, torch.nn.Linear):
        return proj_out(attn_output, mlp_output)
    k, w = attn_output.shape[-1], proj_out.weight  # the bf16 Linear: its weight's column blocks, as views
    return F.linear(attn_output, w[:, :k]) + F.linear(mlp_output, w[:, k:], proj_out.bias)


def _forward_without_concat(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                            joint_attention_kwargs=None):
    """FluxSingleTransformerBlock.forward (diffusers 0.42.1) calling project_halves instead of
    `proj_out(torch.cat([attn_output, mlp_hidden_states], dim=2))`."""
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))
    attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                            **(joint_attention_kwargs or {}))
    hidden_states = residual + gate.unsqueeze(1) * project_halves(self.proj_out, attn_output, mlp_hidden_states)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def _unverified_diffusers() -> str | None:
    import diffusers

    if diffusers.__version__ != VERIFIED_DIFFUSERS:
        return f"verified on diffusers {VERIFIED_DIFFUSERS}, not {diffusers.__version__}"
    return None


def _rewritten(block) -> bool:
    """Whether the block calls _forward_without_concat, directly or under compile's stride wrapper."""
    return any(getattr(block.__dict__.get(name), "__func__", None) is _forward_without_concat
               for name in ("forward", _WRAPPED))


def bf16_enabled() -> bool:
    return not switched_off(BF16_ENV)


def install_bf16(transformer: torch.nn.Module) -> str:
    """Rewrite the single blocks of the exact (bf16) `transformer` in place (their proj_out stays a Linear); returns
    what was done, for the compile optimisation's report."""
    reason = _unverified_diffusers()
    if reason:
        return f"single blocks keep the proj_out concatenation ({reason})"
    n = 0
    for block in getattr(transformer, "single_transformer_blocks", []):
        # the forward the block runs: its own, or the one under compile's stride wrapper if already compiled
        name = _WRAPPED if _WRAPPED in block.__dict__ else "forward"
        current = block.__dict__.get(name)
        if type(block.proj_out) is torch.nn.Linear and (
                current is None or getattr(current, "__func__", None) is type(block).forward):
            if name == "forward":
                bind_forward(block, _forward_without_concat)
            else:
                setattr(block, name, types.MethodType(_forward_without_concat, block))
            n += 1
    return f"{n} single blocks without the proj_out concatenation (off with {BF16_ENV.name}=0)"


def remove(transformer: torch.nn.Module) -> int:
    """Give every single block rewritten here diffusers' forward back (an fp8 copy made from the bf16 transformer
    before it is quantised); returns how many were changed."""
    n = 0
    for block in getattr(transformer, "single_transformer_blocks", []):
        if _rewritten(block):
            for name in ("forward", _WRAPPED):  # compile wraps the copy again itself
                block.__dict__.pop(name, None)
            n += 1
    return n


def split_single_block_proj_out(transformer: torch.nn.Module) -> str:
    """Rewrite every single block of `transformer` (the copy about to be quantised); returns what was done, for the
    optimisation's report."""
    if switched_off(settings.FP8_SPLIT_PROJ_OUT):
        return "single blocks unchanged (FLUX_FP8_SPLIT_PROJ_OUT=0)"
    reason = _unverified_diffusers()
    if reason:
        return f"single blocks unchanged (their rewrite is {reason})"
    n = 0
    for block in getattr(transformer, "single_transformer_blocks", []):
        if isinstance(block.proj_out, torch.nn.Linear):
            block.proj_out = SplitProjOut(block.proj_out, block.proj_out.out_features)  # attention output is `dim`
            bind_forward(block, _forward_without_concat)
            n += 1
    return f"{n} single blocks without the proj_out concatenation"
