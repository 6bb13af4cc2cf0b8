"""The low-precision copy's single blocks without the concatenation before `proj_out` (a rewrite, not a new kernel).

FluxSingleTransformerBlock computes `proj_out(cat([attention_output, gelu(mlp)]))`. Quantised as one linear, that
input needs a row-wise amax over the 15,360-wide concatenation: inductor emitted it as a reduction that recomputes
the GELU plus a separate cast kernel (5.6 ms per step at edit-512 on an H200). Here proj_out becomes two linears,
one per half of its input (W @ [a; m] + b == W_a @ a + (W_m @ m + b)), and the block calls them directly, so the
MLP half's quantisation fuses with its GELU as in the double blocks' feed-forward and each half gets its own row
scale (finer, not coarser). Measured: 47.6 -> 46.8 ms per fp8 transformer call at edit-512 (H200, one session).
Splitting proj_out alone while keeping the concatenation measured slower (inductor materialised it and sliced it).

Only the fp8 copy is changed; the bf16 transformer keeps diffusers' own block. The forward below is a copy of
diffusers 0.42.1's with that one line changed, so it is applied only on that version (tests compare it with the
original block) and `FLUX_FP8_SPLIT_PROJ_OUT=0` turns it off for A/B runs.
"""
from __future__ import annotations

import torch

from .base import bind_forward
from .compile_cache import switched_off

VERIFIED_DIFFUSERS = "0.42.1"


class SplitProjOut(torch.nn.Module):
    """A single block's proj_out (Linear(dim + mlp_dim -> dim)) as two linears, one per half of its input."""

    def __init__(self, linear: torch.nn.Linear, split: int):
        super().__init__()
        w, b = linear.weight.detach(), linear.bias
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


def _forward_without_concat(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                            joint_attention_kwargs=None):
    """FluxSingleTransformerBlock.forward (diffusers 0.42.1) calling SplitProjOut's halves instead of
    `proj_out(torch.cat([attn_output, mlp_hidden_states], dim=2))`."""
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))
    attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                            **(joint_attention_kwargs or {}))
    hidden_states = residual + gate.unsqueeze(1) * self.proj_out(attn_output, mlp_hidden_states)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def split_single_block_proj_out(transformer: torch.nn.Module) -> str:
    """Rewrite every single block of `transformer` (the copy about to be quantised); returns what was done, for the
    optimisation's report."""
    import diffusers

    if switched_off("FLUX_FP8_SPLIT_PROJ_OUT"):
        return "single blocks unchanged (FLUX_FP8_SPLIT_PROJ_OUT=0)"
    if diffusers.__version__ != VERIFIED_DIFFUSERS:
        return (f"single blocks unchanged (their rewrite is verified on diffusers {VERIFIED_DIFFUSERS}, "
                f"not {diffusers.__version__})")
    n = 0
    for block in getattr(transformer, "single_transformer_blocks", []):
        if isinstance(block.proj_out, torch.nn.Linear):
            block.proj_out = SplitProjOut(block.proj_out, block.proj_out.out_features)  # attention output is `dim`
            bind_forward(block, _forward_without_concat)
            n += 1
    return f"{n} single blocks without the proj_out concatenation"
