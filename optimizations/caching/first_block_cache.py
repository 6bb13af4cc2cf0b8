"""First-block cache ("FBCache") for one `diffusers.FluxTransformer2DModel` instance, with per-request state.

The idea (para-attn's "First Block Cache", diffusers' `FirstBlockCacheConfig`): run only the first double-stream
block; if its residual barely changed since the last fully computed step, the remaining blocks would barely change
too, so reuse their cached residual instead of running them.

Why our own and not para-attn / diffusers':
- para-attn's `apply_cache_on_pipe` patches the pipeline *class* and keeps a global cache context;
- diffusers' `apply_first_block_cache` needs `transformer.cache_context(...)`, which `FluxKontextPipeline` 0.42.1
  never sets, and fixes the threshold when the cache is enabled.
Here the threshold and all state belong to one `session(...)` (one request), and only the one transformer instance
the cache was installed on is touched.

Installation is per instance: `FirstBlockCache(transformer)` sets an instance attribute `transformer.forward`
(`nn.Module.__call__` looks `forward` up on the instance first). `FluxTransformer2DModel.forward` (the class
attribute) is never modified, so other instances and copies are unaffected. Outside a session the instance
`forward` calls the original bound forward with the original arguments: an exact passthrough.

Inside a session every transformer call runs `_cached_forward`, a line-by-line mirror of
`FluxTransformer2DModel.forward` of diffusers 0.42.1 (same modules, same op order, the blocks called as modules so
per-block `torch.compile` keeps working). With threshold 0 nothing is ever skipped and the output is bit-identical to
the uncached forward (tested). Decision per call:

    r   = hidden_states after transformer_blocks[0] - hidden_states before it     (image tokens only)
    rel = mean(|r - r_ref|) / mean(|r_ref|)
    skip when an r_ref exists and rel < threshold

`r_ref` is the first-block residual of the last *fully computed* call of the same conditioning branch, as in
para-attn and diffusers (both only refresh it on computed steps). Refreshing it on every call instead would let a
slow drift be skipped forever, since each step only compares against its immediate predecessor.

What is cached on a computed call: `hidden_states_final - hidden_states_after_first_block`, only for the image
stream. In 0.42.1 the single-stream blocks take `hidden_states` and `encoder_hidden_states` separately, concatenate
them internally and split them again on return; after the last block only `hidden_states` reaches `norm_out`, so
the final `encoder_hidden_states` is dead and its residual need not be kept (older diffusers concatenated the two
streams before the single blocks, which is why para-attn also caches an encoder residual).

Conditioning branches: true CFG calls the transformer twice per step (positive and negative prompt embeds), and the
two branches must not be compared with each other. State is keyed by
`(encoder_hidden_states.data_ptr(), shape, dtype, device)`: FluxKontextPipeline passes the same `prompt_embeds` /
`negative_prompt_embeds` tensors at every step, and both stay alive for the whole denoising loop, so their storage
addresses are stable and distinct. (A caller that re-allocated the embeds every call would get a fresh key each call
and simply never skip: safe, just no speed-up.)

Not supported inside a session (raises NotImplementedError; outside a session everything passes through):
ControlNet residuals (`controlnet_block_samples` / `controlnet_single_block_samples`) and IP-Adapter
(`joint_attention_kwargs["ip_adapter_image_embeds"]`). Neither is used by this server.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import diffusers
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers import transformer_flux as _transformer_flux
from diffusers.utils.peft_utils import apply_lora_scale

log = logging.getLogger(__name__)

# The version whose FluxTransformer2DModel.forward `_cached_forward` mirrors.
MIRRORED_DIFFUSERS_VERSION = "0.42.1"


@dataclass
class CacheStats:
    """Per-session counts. One "step" is one transformer call (with true CFG there are two calls per step)."""

    threshold: float
    computed: int = 0  # calls that ran every block
    skipped: int = 0  # calls that ran only the first block and reused the cached residual
    # rel diff of each call that had a reference to compare with, in call order (for diagnostics / tuning).
    diffs: list[float] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return self.computed + self.skipped


@dataclass
class _BranchState:
    first_residual: torch.Tensor  # r of the last fully computed call of this branch
    remaining_residual: torch.Tensor  # hidden_states_final - hidden_states_after_first_block of that call


class _Session:
    def __init__(self, threshold: float, collective=None):
        self.threshold = float(threshold)
        self.collective = collective  # context parallelism: sums over the whole split sequence (RunContext)
        self.stats = CacheStats(threshold=self.threshold)
        self.branches: dict[tuple, _BranchState] = {}


class FirstBlockCache:
    """Installs a first-block cache on one FluxTransformer2DModel instance.

    >>> cache = FirstBlockCache(pipe.transformer)
    >>> with cache.session(threshold=0.08) as stats:
    ...     pipe(...)
    >>> stats.computed, stats.skipped
    >>> cache.remove()  # optional: restores the instance exactly as it was
    """

    def __init__(self, transformer: torch.nn.Module):
        if not isinstance(transformer, _transformer_flux.FluxTransformer2DModel):
            raise TypeError(f"FirstBlockCache needs a FluxTransformer2DModel, got {type(transformer).__name__}")
        if "forward" in vars(transformer):
            # Something (another cache, an accelerate / diffusers hook) already replaced this instance's forward.
            # The cached path would bypass it, so refuse rather than silently drop it. Install this cache first.
            raise RuntimeError(
                "transformer.forward is already overridden on this instance "
                f"({vars(transformer)['forward']!r}); install FirstBlockCache before other forward hooks"
            )
        if diffusers.__version__ != MIRRORED_DIFFUSERS_VERSION:
            log.warning(
                "FirstBlockCache mirrors FluxTransformer2DModel.forward of diffusers %s, running %s: "
                "check that threshold 0 is still bit-identical (tests/optimizations/test_first_block_cache.py)",
                MIRRORED_DIFFUSERS_VERSION, diffusers.__version__,
            )
        self.transformer = transformer
        self._original_forward = transformer.forward  # the bound class forward of this instance
        self._lock = threading.Lock()
        self._session: _Session | None = None
        self._installed = True
        # Instance attribute only: nn.Module.__setattr__ stores a plain callable in the instance __dict__.
        transformer.forward = self._forward

    def __deepcopy__(self, memo):
        # Reached through `copy.deepcopy(transformer)` (the instance `forward` is a bound method of this cache):
        # the copy gets its own cache, installed on the copied transformer, with no session and no cached tensors.
        # (A threading.Lock cannot be deep-copied, so the default would fail.)
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.transformer = copy.deepcopy(self.transformer, memo)
        new._original_forward = copy.deepcopy(self._original_forward, memo)  # rebinds to the copied transformer
        new._lock = threading.Lock()
        new._session = None
        new._installed = self._installed
        return new

    # ------------------------------------------------------------------------------------------------------------
    # Installation
    # ------------------------------------------------------------------------------------------------------------
    @property
    def installed(self) -> bool:
        return self._installed

    @property
    def active(self) -> bool:
        return self._session is not None

    def remove(self) -> None:
        """Undo the installation: the instance's forward is the class forward again."""
        if not self._installed:
            return
        if self._session is not None:
            raise RuntimeError("cannot remove FirstBlockCache while a session is active")
        current = vars(self.transformer).get("forward")
        if current != self._forward:
            raise RuntimeError(
                "transformer.forward was replaced on top of FirstBlockCache; remove that wrapper first"
            )
        del self.transformer.forward  # drops the instance attribute; the class forward shows through again
        self._installed = False

    # ------------------------------------------------------------------------------------------------------------
    # Sessions (one per request)
    # ------------------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, threshold: float, collective=None) -> Iterator[CacheStats]:
        """Activate the cache for one request. Yields the live CacheStats; all cached tensors are dropped on exit.

        `collective` (context parallelism: each rank holds part of the tokens): its `reduce_token_sums` makes the
        skip decision from the whole sequence, the same on every rank."""
        if not self._installed:
            raise RuntimeError("FirstBlockCache was removed; create a new one")
        threshold = float(threshold)
        if math.isnan(threshold) or threshold < 0:
            raise ValueError(f"threshold must be a number >= 0, got {threshold}")
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                "a FirstBlockCache session is already active on this transformer "
                "(nested or concurrent sessions are not supported: one request at a time)"
            )
        try:
            sess = _Session(threshold, collective)
            self._session = sess
            try:
                yield sess.stats
            finally:
                self._session = None
                sess.branches.clear()  # no tensors outlive the request
        finally:
            self._lock.release()

    # ------------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------------
    def _forward(self, *args, **kwargs):
        sess = self._session
        if sess is None:
            return self._original_forward(*args, **kwargs)  # exact passthrough
        return _cached_forward(self.transformer, *args, _fbc_session=sess, **kwargs)


def _branch_key(encoder_hidden_states: torch.Tensor) -> tuple:
    # See module docstring: the pipeline reuses the same embeds tensor per branch for the whole loop.
    return (
        encoder_hidden_states.data_ptr(),
        tuple(encoder_hidden_states.shape),
        encoder_hidden_states.dtype,
        encoder_hidden_states.device,
    )


def _should_skip(sess: _Session, state: _BranchState | None, first_residual: torch.Tensor) -> bool:
    if sess.threshold <= 0:
        return False  # threshold 0 never skips: no comparison, no host sync
    if state is None or state.first_residual.shape != first_residual.shape:
        return False
    prev = state.first_residual
    if sess.collective is not None:
        # Split sequence: the ratio of sums over every rank's tokens (a ratio of means over equal counts), the same
        # number on every rank, so every rank skips the same steps (para-attn's cache all-reduces it likewise).
        diff, ref = sess.collective.reduce_token_sums((first_residual - prev).abs(), prev.abs())
        rel = diff / ref
    else:
        rel = (first_residual - prev).abs().mean() / prev.abs().mean()
    # `.item()` is a host sync: the skip decision changes which kernels are launched next, so it is inherent to
    # the method (diffusers' and para-attn's FBCache sync here too).
    rel = rel.item()
    sess.stats.diffs.append(rel)
    return rel < sess.threshold  # NaN / inf (e.g. an all-zero reference) never skip


@apply_lora_scale("joint_attention_kwargs")
def _cached_forward(
    self,  # the FluxTransformer2DModel instance (named `self` to keep the mirror of the original readable)
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor = None,
    pooled_projections: torch.Tensor = None,
    timestep: torch.LongTensor = None,
    img_ids: torch.Tensor = None,
    txt_ids: torch.Tensor = None,
    guidance: torch.Tensor = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
    controlnet_block_samples=None,
    controlnet_single_block_samples=None,
    return_dict: bool = True,
    controlnet_blocks_repeat: bool = False,
    *,
    _fbc_session: _Session,
) -> torch.Tensor | Transformer2DModelOutput:
    """Mirror of FluxTransformer2DModel.forward (diffusers 0.42.1) with the first-block cache.

    Decorated with the same `apply_lora_scale` as the original, so PEFT LoRA scaling behaves identically.
    """
    sess = _fbc_session
    if controlnet_block_samples is not None or controlnet_single_block_samples is not None:
        raise NotImplementedError("FirstBlockCache does not support ControlNet residuals")
    if joint_attention_kwargs is not None and "ip_adapter_image_embeds" in joint_attention_kwargs:
        raise NotImplementedError("FirstBlockCache does not support IP-Adapter image embeds")

    key = _branch_key(encoder_hidden_states)  # before context_embedder replaces the name

    hidden_states = self.x_embedder(hidden_states)

    timestep = timestep.to(hidden_states.dtype) * 1000
    if guidance is not None:
        guidance = guidance.to(hidden_states.dtype) * 1000

    temb = (
        self.time_text_embed(timestep, pooled_projections)
        if guidance is None
        else self.time_text_embed(timestep, guidance, pooled_projections)
    )
    encoder_hidden_states = self.context_embedder(encoder_hidden_states)

    if txt_ids.ndim == 3:
        _transformer_flux.logger.warning(
            "Passing `txt_ids` 3d torch.Tensor is deprecated."
            "Please remove the batch dimension and pass it as a 2d torch Tensor"
        )
        txt_ids = txt_ids[0]
    if img_ids.ndim == 3:
        _transformer_flux.logger.warning(
            "Passing `img_ids` 3d torch.Tensor is deprecated."
            "Please remove the batch dimension and pass it as a 2d torch Tensor"
        )
        img_ids = img_ids[0]

    ids = torch.cat((txt_ids, img_ids), dim=0)
    image_rotary_emb = self.pos_embed(ids)

    def run_block(block, hidden_states, encoder_hidden_states):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(
                block,
                hidden_states,
                encoder_hidden_states,
                temb,
                image_rotary_emb,
                joint_attention_kwargs,
            )
        return block(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            temb=temb,
            image_rotary_emb=image_rotary_emb,
            joint_attention_kwargs=joint_attention_kwargs,
        )

    # --- first double-stream block: always runs ---------------------------------------------------------------
    blocks = self.transformer_blocks
    hidden_states_before = hidden_states
    encoder_hidden_states, hidden_states = run_block(blocks[0], hidden_states, encoder_hidden_states)
    first_residual = hidden_states - hidden_states_before

    state = sess.branches.get(key)
    if _should_skip(sess, state, first_residual):
        # Remaining double blocks and all single blocks replaced by the cached residual of the image stream.
        hidden_states = hidden_states + state.remaining_residual
        sess.stats.skipped += 1
    else:
        hidden_states_after_first = hidden_states
        for block in blocks[1:]:
            encoder_hidden_states, hidden_states = run_block(block, hidden_states, encoder_hidden_states)
        for block in self.single_transformer_blocks:
            encoder_hidden_states, hidden_states = run_block(block, hidden_states, encoder_hidden_states)
        if sess.threshold > 0:  # threshold 0 never reads the cache: keep no tensors
            sess.branches[key] = _BranchState(
                first_residual=first_residual,
                remaining_residual=hidden_states - hidden_states_after_first,
            )
        sess.stats.computed += 1

    hidden_states = self.norm_out(hidden_states, temb)
    output = self.proj_out(hidden_states)

    if not return_dict:
        return (output,)

    return Transformer2DModelOutput(sample=output)
