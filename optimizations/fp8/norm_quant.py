"""The fp8 copy's activation quantisation done by the kernels that produce the activations (Triton).

Every fp8 linear quantises its input row-wise (fp8/linear.py). Where that input is a LayerNorm + AdaLN modulation
output, inductor fused the quantisation into the norm as looped reductions that read each row several times: in an
H100 profile of an fp8 step at edit-512 (BENCHMARKS.md, 2026-11-23) those kernels took 2.5 ms per call against
~0.6 ms to read each row once and write its fp8 bytes once, and quantising the attention output (a copy out of
cuDNN's (batch, heads, seq, head_dim) layout, then amax and cast) another 0.95 ms against ~0.4 ms. Here:

- `norm_modulate_quant`: one program holds a whole row (3,072 values) in registers: optionally the residual update
  before the norm (h = x + gate * delta, written once, the stream the block carries on with), LayerNorm without
  affine, * (1 + scale) + shift, the row amax and the fp8 cast. The single blocks' text and image rows are read
  where they lie, so their concatenation is never written. The row is held as at most three unpadded pieces of a
  power-of-two width (`row_chunks`: 3 x 1,024, on 2 warps), not padded to 4,096 lanes as the kernel before it
  (now bench/row_quant_padded.py): bench/bench_row_quant.py measured the
  chunked layout 11-20% faster on an H100 in the plain case (BENCHMARKS.md, "The fp8 row-quantisation kernels:
  other layouts").
- `quantize_heads`: reads the attention output in cuDNN's layout and writes contiguous fp8 rows.

The rows travel as fp8_linear.Fp8Rows to the linears, which skip their own quantisation. So the blocks change: the
double and single blocks' forwards below are diffusers 0.42.1's (the single one as fusions/split_proj_out.py rewrites
it) with the norms, the modulation and the attention residual before norm2 replaced by these calls, and their
attention processor (Fp8OutputProcessor) returns the output as fp8 rows. Applied only on that diffusers version,
only to the fp8 copy, and only to blocks whose consumers are all fp8 linears; `FLUX_FP8_FUSED_NORM=0` turns it off
for A/B runs.

Numerics: fp32 from load to cast, as inductor's fused code computed it (eager diffusers rounds the modulated norm to
bf16 before quantising); the mean, then the variance of the centred values, over the row in registers; the residual
stream h is rounded once to the model's dtype and the norm reads it so rounded; scales as quantize_rows. The chunked
and the padded kernel sum the row in a different order (per piece, then the pieces), so an fp8 value can rarely
land one step apart between them.
Lossy like the rest of the fp8 tier; tests compare the kernels with a torch reference and the rewritten blocks with
the unfused fp8 copy.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from optimizations.base import bind_forward
from kontext_server import settings
from optimizations.compiling.cache import switched_off
from optimizations.fp8.linear import Fp8Linear, Fp8Rows, quantize_rows
from optimizations.qk_norm_rope import FusedQKNormRopeProcessor, triton_cdiv

VERIFIED_DIFFUSERS = "0.42.1"
# Tokens per program and warps of the attention-output kernel.
HEADS_TOKENS, HEADS_WARPS = 2, 8


@functools.cache
def _kernels():
    from optimizations.kernels import fp8_row_quant as fp8_norm_quant_kernel

    return fp8_norm_quant_kernel


# ---- the row-chunk layout of the row-quantisation kernels (this module's norm kernel and fp8/gelu_quant.py's) ----
def row_chunks(k: int) -> tuple[int, int]:
    """(CHUNK, NCHUNK): a K-wide row as NCHUNK unpadded CHUNK-wide pieces, CHUNK the power of two >= K / 3, so
    NCHUNK is at most 3 (3,072 = 3 x 1,024; 12,288 = 3 x 4,096) and only the last piece may run past K."""
    chunk = _next_power_of_2(triton_cdiv(k, 3))
    return chunk, triton_cdiv(k, chunk)


def chunk_warps(chunk: int) -> int:
    """Warps for a row held as CHUNK-wide pieces: 16 values of each piece per thread, 1 to 8 warps. That is the
    layout of both configurations chosen from bench/bench_row_quant.py's H100 figures (BENCHMARKS.md: GELU,
    4,096-wide pieces on 8 warps; norm, 1,024-wide pieces on 2 warps); other sizes (the tiny test model's) are not
    measured, and fewer warps keep small rows from leaving most threads idle."""
    return min(8, max(1, chunk // (16 * 32)))


# ---- the kernels as functions of tensors -------------------------------------------------------------------------
def launch_norm_modulate_quant(kernel, x, tail, delta, mod, shift_chunk: int, scale_chunk: int, gate_chunk: int,
                               eps: float, num_warps: int | None = None):
    """Run `kernel`, the chunked norm kernel (`norm_modulate_quant_kernel`, or torch.library's wrap_triton of it):
    one row per program, the row as row_chunks(K) pieces. x: (batch, S_x, K); tail: rows after x's
    (batch, S_tail, K) or None; delta: the residual update (batch, S_x, K) or None; mod: the AdaLN output
    (batch, n * K), whose K-wide chunks `shift_chunk`, `scale_chunk` and `gate_chunk` (the residual's gate; -1
    without delta) are used. mod is taken whole, not as chunk views: inductor would write each view out as a tensor of
    its own before the call (one small kernel each). Returns fp8 rows (batch, S, K), their fp32 scales (batch, S, 1)
    and the updated residual stream h (batch, S, K) (an empty tensor without delta)."""
    outputs, args = _norm_operands(x, tail, delta, mod, shift_chunk, scale_chunk, gate_chunk, eps)
    b, s, k = outputs[0].shape
    chunk, nchunk = row_chunks(k)
    kernel[(s, b)](*args, CHUNK=chunk, NCHUNK=nchunk, EVEN=k % chunk == 0, HAS_TAIL=tail is not None,
                   HAS_DELTA=delta is not None, num_warps=num_warps or chunk_warps(chunk))
    return outputs


def _norm_operands(x, tail, delta, mod, shift_chunk: int, scale_chunk: int, gate_chunk: int, eps: float):
    """Both norm kernels' outputs (q, q_scale, h) and their run-time arguments (the kernels take the same ones),
    after checking the inputs."""
    b, s_head, k = x.shape
    s = s_head + (tail.shape[1] if tail is not None else 0)
    if tail is not None and delta is not None:
        raise ValueError("norm_modulate_quant: a residual update over concatenated rows is not supported")
    if tail is not None and tail.dtype != x.dtype:  # the chunked kernel picks a row's source pointer: one type
        raise ValueError("norm_modulate_quant: the tail rows must have x's dtype")
    for t in (x, tail, delta, mod):
        if t is not None and t.stride(-1) != 1:
            raise ValueError("rows must be contiguous in their last dimension")
    chunks = (shift_chunk, scale_chunk) + ((gate_chunk,) if delta is not None else ())
    if mod.dim() != 2 or mod.shape[0] != b or min(chunks) < 0 or (max(chunks) + 1) * k > mod.shape[1]:
        raise ValueError(f"mod must have shape ({b}, n * {k}) with the chunks {chunks} inside it")
    q = torch.empty((b, s, k), dtype=torch.float8_e4m3fn, device=x.device)
    q_scale = torch.empty((b, s, 1), dtype=torch.float32, device=x.device)
    h = torch.empty((b, s, k) if delta is not None else (0,), dtype=x.dtype, device=x.device)
    t_src = tail if tail is not None else x  # unread without a tail / delta
    d_src = delta if delta is not None else x
    args = (x, t_src, d_src, mod, q, q_scale, h, s, s_head, k, x.stride(0), x.stride(1), t_src.stride(0),
            t_src.stride(1), d_src.stride(0), d_src.stride(1), mod.stride(0), shift_chunk * k, scale_chunk * k,
            max(gate_chunk, 0) * k, eps)
    return (q, q_scale, h), args


def launch_quantize_heads(kernel, out, tokens: int = HEADS_TOKENS, num_warps: int = HEADS_WARPS):
    """Row-wise fp8 of an attention output (batch, S, heads, head_dim) in any layout with head_dim contiguous:
    fp8 rows (batch, S, heads * head_dim) and scales (batch, S, 1)."""
    b, s, h, d = out.shape
    if out.stride(3) != 1 or d & (d - 1):
        raise ValueError("attention output needs a contiguous, power-of-two head_dim")
    q = torch.empty((b, s, h * d), dtype=torch.float8_e4m3fn, device=out.device)
    q_scale = torch.empty((b, s, 1), dtype=torch.float32, device=out.device)
    kernel[(triton_cdiv(s, tokens), b)](out, q, q_scale, s, h, out.stride(0), out.stride(1), out.stride(2), D=d,
                                        HP=_next_power_of_2(h), BLOCK_T=tokens, num_warps=num_warps)
    return q, q_scale


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@functools.cache
def _ops():
    """Register both kernels as torch ops (torch.compile traces them into the compiled blocks). Called when the
    blocks are rewritten, outside any compiled region: dynamo cannot trace the registration."""
    from torch.library import triton_op, wrap_triton

    kernels = _kernels()

    @triton_op("flux_kontext::norm_modulate_quant", mutates_args={})
    def norm_modulate_quant(x: torch.Tensor, tail: torch.Tensor | None, delta: torch.Tensor | None,
                            mod: torch.Tensor, shift_chunk: int, scale_chunk: int, gate_chunk: int, eps: float
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return launch_norm_modulate_quant(wrap_triton(kernels.norm_modulate_quant_kernel), x, tail, delta, mod,
                                          shift_chunk, scale_chunk, gate_chunk, eps)

    @triton_op("flux_kontext::quantize_heads", mutates_args={})
    def quantize_heads(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return launch_quantize_heads(wrap_triton(kernels.quantize_heads_kernel), out)

    return norm_modulate_quant, quantize_heads


def norm_quant(x, mod, shift_chunk: int, scale_chunk: int, eps: float, tail=None) -> Fp8Rows:
    """fp8 rows of LayerNorm([x; tail]) * (1 + scale) + shift, scale and shift being chunks of the AdaLN output."""
    q, s, _ = torch.ops.flux_kontext.norm_modulate_quant(x, tail, None, mod, shift_chunk, scale_chunk, -1, eps)
    return Fp8Rows(q, s)


def residual_norm_quant(x, delta, mod, gate_chunk: int, shift_chunk: int, scale_chunk: int,
                        eps: float) -> tuple[torch.Tensor, Fp8Rows]:
    """h = x + gate * delta, and the fp8 rows of LayerNorm(h) * (1 + scale) + shift (chunks of the AdaLN output)."""
    q, s, h = torch.ops.flux_kontext.norm_modulate_quant(x, None, delta, mod, shift_chunk, scale_chunk, gate_chunk,
                                                         eps)
    return h, Fp8Rows(q, s)


def _chunk(mod, i: int, k: int):
    """Chunk i (K wide) of an AdaLN output (batch, n * K), as the kernel reads it."""
    return mod[:, i * k:(i + 1) * k]


def norm_modulate_quant_reference(x, tail, delta, mod, shift_chunk: int, scale_chunk: int, gate_chunk: int,
                                  eps: float):
    """What the norm kernel computes, in plain torch (tests): (fp8 rows, scales, h or None)."""
    k = x.shape[-1]
    chunk = lambda i: _chunk(mod, i, k).float()[:, None]  # noqa: E731
    rows = x if tail is None else torch.cat([x, tail], dim=1)
    h = None
    if delta is not None:
        h = rows = (rows.float() + chunk(gate_chunk) * delta.float()).to(x.dtype)
    y = F.layer_norm(rows.float(), (k,), eps=eps) * (1 + chunk(scale_chunk)) + chunk(shift_chunk)
    q, s = quantize_rows(y.reshape(-1, k))
    return q.reshape(y.shape), s.reshape(*y.shape[:-1], 1), h


# ---- the rewritten blocks -------------------------------------------------------------------------------------------
# AdaLayerNormZero's output chunks, in diffusers' order; AdaLayerNormZeroSingle's are the first three.
SHIFT_MSA, SCALE_MSA, GATE_MSA, SHIFT_MLP, SCALE_MLP, GATE_MLP = range(6)


def _modulation(ada_norm, temb):
    """AdaLayerNormZero(Single)'s linear output, all chunks (its linear is the modulation table's lookup when that
    is installed)."""
    return ada_norm.linear(ada_norm.silu(temb))


def _double_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                          joint_attention_kwargs=None):
    """FluxTransformerBlock.forward (diffusers 0.42.1) with norm1 / norm1_context, and the attention residual + norm2
    / norm2_context, each one kernel that writes the fp8 rows of the next linear. (No IP-adapter output: the fused
    processor never returns one.)"""
    mod, c_mod = _modulation(self.norm1, temb), _modulation(self.norm1_context, temb)
    eps, k = self.norm2.eps, hidden_states.shape[-1]  # the four norms' eps are checked equal at the rewrite
    attn_output, context_attn_output = self.attn(
        hidden_states=norm_quant(hidden_states, mod, SHIFT_MSA, SCALE_MSA, eps),
        encoder_hidden_states=norm_quant(encoder_hidden_states, c_mod, SHIFT_MSA, SCALE_MSA, eps),
        image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))

    hidden_states, ff_input = residual_norm_quant(hidden_states, attn_output, mod, GATE_MSA, SHIFT_MLP, SCALE_MLP,
                                                  eps)
    hidden_states = hidden_states + _chunk(mod, GATE_MLP, k).unsqueeze(1) * self.ff(ff_input)

    encoder_hidden_states, c_ff_input = residual_norm_quant(encoder_hidden_states, context_attn_output, c_mod,
                                                            GATE_MSA, SHIFT_MLP, SCALE_MLP, eps)
    encoder_hidden_states = encoder_hidden_states + _chunk(c_mod, GATE_MLP, k).unsqueeze(1) \
        * self.ff_context(c_ff_input)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _single_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                          joint_attention_kwargs=None):
    """FluxSingleTransformerBlock.forward (diffusers 0.42.1, proj_out's halves called directly as in
    fusions/split_proj_out.py) with the norm + modulation one kernel that reads the text and image rows in place and
    writes the fp8 rows that both the MLP and the attention projections take."""
    text_seq_len = encoder_hidden_states.shape[1]
    mod = _modulation(self.norm, temb)
    rows = norm_quant(encoder_hidden_states, mod, SHIFT_MSA, SCALE_MSA, self.norm.norm.eps, tail=hidden_states)
    mlp_hidden_states = self.act_mlp(self.proj_mlp(rows))
    attn_output = self.attn(hidden_states=rows, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    # The residual's concatenation is only read by this sum, so inductor fuses it in and never writes it.
    residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    gate = _chunk(mod, GATE_MSA, hidden_states.shape[-1])
    hidden_states = residual + gate.unsqueeze(1) * self.proj_out(attn_output, mlp_hidden_states)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


class Fp8OutputProcessor(FusedQKNormRopeProcessor):
    """The fused attention processor of the fp8 copy: the attention output leaves as fp8 rows, quantised in one pass
    from cuDNN's layout, for the fp8 output projections (to_out / to_add_out here; a single block's proj_out half
    after it)."""

    def __init__(self):
        super().__init__()
        _ops()

    def project_out(self, attn, out: torch.Tensor, n_txt: int | None):
        rows = Fp8Rows(*torch.ops.flux_kontext.quantize_heads(out))
        if n_txt is None:
            return rows
        text = Fp8Rows(rows.data[:, :n_txt], rows.scale[:, :n_txt])
        image = Fp8Rows(rows.data[:, n_txt:], rows.scale[:, n_txt:])
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)


# ---- which blocks qualify, and the rewrite ---------------------------------------------------------------------------
def _plain_layer_norm(norm) -> bool:
    return isinstance(norm, torch.nn.LayerNorm) and norm.weight is None and norm.bias is None \
        and len(norm.normalized_shape) == 1


def _takes_fp8_rows(module) -> bool:
    """A feed-forward input or projection that only hands its input to Fp8Linears."""
    if isinstance(module, Fp8Linear):
        return True
    proj = getattr(module, "proj", None)  # diffusers' GELU(proj) when the GELU fusion is off
    return isinstance(proj, Fp8Linear)


def _attention_inputs_fp8(attn, with_text: bool) -> bool:
    names = ["to_qkv"] if getattr(attn, "fused_projections", False) else ["to_q", "to_k", "to_v"]
    if with_text:
        names += ["to_added_qkv"] if getattr(attn, "fused_projections", False) else \
            ["add_q_proj", "add_k_proj", "add_v_proj"]
    return all(isinstance(getattr(attn, n, None), Fp8Linear) for n in names) \
        and isinstance(attn.processor, FusedQKNormRopeProcessor)


def double_block_reason(block) -> str | None:
    """None when a FluxTransformerBlock can take the fused forward, else why not."""
    ada = (block.norm1, block.norm1_context)
    if any(getattr(a, "emb", None) is not None or not _plain_layer_norm(getattr(a, "norm", None)) for a in ada):
        return "its AdaLN norms are not plain LayerNorms driven by temb"
    norms = [a.norm for a in ada] + [block.norm2, block.norm2_context]
    if not all(_plain_layer_norm(n) for n in norms) or len({n.eps for n in norms}) != 1:
        return "its norms are not LayerNorms without affine and with one eps"
    if not _attention_inputs_fp8(block.attn, with_text=True):
        return "its attention projections are not all fp8 linears behind the fused processor"
    if not all(_takes_fp8_rows(ff.net[0]) for ff in (block.ff, block.ff_context)):
        return "its feed-forward input linears are not fp8 linears"
    if not (isinstance(block.attn.to_out[0], Fp8Linear) and isinstance(block.attn.to_add_out, Fp8Linear)):
        return "its attention output projections are not fp8 linears"
    return None


def single_block_reason(block) -> str | None:
    from optimizations.fusions.split_proj_out import SplitProjOut

    if not _plain_layer_norm(getattr(block.norm, "norm", None)):
        return "its AdaLN norm is not a LayerNorm without affine"
    if not (isinstance(block.proj_mlp, Fp8Linear) and _attention_inputs_fp8(block.attn, with_text=False)):
        return "its MLP / attention projections are not all fp8 linears behind the fused processor"
    if not (isinstance(block.proj_out, SplitProjOut) and isinstance(block.proj_out.attn, Fp8Linear)):
        return "its proj_out is not split into fp8 halves (fusions/split_proj_out.py)"
    return None


def fuse_norm_quantisation(transformer: torch.nn.Module) -> str:
    """Rewrite the fp8 copy's blocks (after its linears became Fp8Linears); returns the report line."""
    import diffusers

    if switched_off(settings.FP8_FUSED_NORM):
        return "norm + quantisation not fused (FLUX_FP8_FUSED_NORM=0)"
    if diffusers.__version__ != VERIFIED_DIFFUSERS:
        return (f"norm + quantisation not fused (the block rewrite is verified on diffusers {VERIFIED_DIFFUSERS}, "
                f"not {diffusers.__version__})")
    try:
        _ops()
    except ImportError:
        return "norm + quantisation not fused (Triton is not installed)"
    processor, done, skipped = None, {"double": 0, "single": 0}, []
    for kind, blocks, reason_of, forward in (
            ("double", getattr(transformer, "transformer_blocks", []), double_block_reason, _double_block_forward),
            ("single", getattr(transformer, "single_transformer_blocks", []), single_block_reason,
             _single_block_forward)):
        for i, block in enumerate(blocks):
            reason = reason_of(block)
            if reason:
                skipped.append(f"{kind} block {i}: {reason}")
                continue
            if processor is None:  # one per transformer, keeping its attention backend
                processor = Fp8OutputProcessor()
                processor._attention_backend = block.attn.processor._attention_backend
            bind_forward(block, forward)
            block.attn.set_processor(processor)
            done[kind] += 1
    note = (f"LayerNorm + modulation (+ residual) + fp8 quantisation in one Triton pass, and the attention output "
            f"quantised in one pass, in {done['double']} double and {done['single']} single blocks")
    return note + (f" (not in {len(skipped)}: {skipped[0]})" if skipped else "")
