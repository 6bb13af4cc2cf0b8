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
per-block `torch.compile` keeps working), in three pieces: `_head` (up to and including the first block),
`_remaining` (the other blocks) and `_finish` (norm_out, proj_out). With threshold 0 nothing is ever skipped and the
output is bit-identical to the uncached forward (tested). Decision per call:

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
and simply never skip: safe, just no speed-up. Under graphs such extra branches beyond GRAPH_SLOTS run the uncached
whole-step graph.)

Under CUDA graphs (optimizations/cuda_graphs.py) the same decision is taken from three captured pieces per call shape
and branch, instead of `_cached_forward`: the *head* (embedders, rotary embedding, modulation lookup, the first
block, and `rel` left on the device as a scalar), the *tail* (the remaining blocks, norm_out and proj_out; it also
writes this call's `r` and remaining residual into the branch's reference buffers) and the *skip* path (hidden after
the first block + the cached residual, norm_out, proj_out). The host reads `rel` once per call (`graph_decide`) and
the runner replays the tail or the skip. The pieces are the functions `_cached_forward` itself is made of, and the
decision is the same function of the same numbers (`_decide`), so on the same inputs the graphs compute and skip the
same calls as the eager cache. The references live in `StaticRefs`: buffers kept across requests at fixed addresses
(the graphs read and write them there), one per call shape and branch *slot* (the order a branch first appears in a
request: 0 for the positive prompt, 1 for true CFG's negative one), zeroed when the session ends; whether a slot
holds a reference for this request is the session's `have_ref`, so nothing of one request is compared with the next.

Not supported inside a session (raises NotImplementedError; outside a session everything passes through):
ControlNet residuals (`controlnet_block_samples` / `controlnet_single_block_samples`) and IP-Adapter
(`joint_attention_kwargs["ip_adapter_image_embeds"]`); under graphs, any non-empty `joint_attention_kwargs`. None is
used by this server.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import diffusers
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers import transformer_flux as _transformer_flux
from diffusers.utils.peft_utils import apply_lora_scale

log = logging.getLogger(__name__)

# The version whose FluxTransformer2DModel.forward `_cached_forward` mirrors.
MIRRORED_DIFFUSERS_VERSION = "0.42.1"

# Branch slots with captured graphs per call shape: true CFG's two conditioning branches. A request whose calls bring
# more distinct conditioning tensors (a caller that re-allocates its embeds every call) runs the extra ones through
# the uncached graph: computed, never skipped (what the eager cache does with a branch it never sees again).
GRAPH_SLOTS = 2


@dataclass
class CacheStats:
    """Per-session counts. One "step" is one transformer call (with true CFG there are two calls per step)."""

    threshold: float
    computed: int = 0  # calls that ran every block
    skipped: int = 0  # calls that ran only the first block and reused the cached residual
    # rel diff of each call that had a reference to compare with, in call order (for diagnostics / tuning).
    diffs: list[float] = field(default_factory=list)
    graphed: bool = False  # whether the calls ran as captured graphs (the head / tail / skip pieces)

    @property
    def calls(self) -> int:
        return self.computed + self.skipped


@dataclass
class _BranchState:
    first_residual: torch.Tensor  # r of the last fully computed call of this branch
    remaining_residual: torch.Tensor  # hidden_states_final - hidden_states_after_first_block of that call


@dataclass
class StaticRefs:
    """One branch slot's reference at one call shape, for captured graphs: `first_residual` is r_ref (the head reads
    it), `remaining_residual` the cached residual (the skip path reads it); the tail writes both. Allocated once and
    kept across requests, since graphs read and write them at their addresses; zeroed when a session ends."""

    first_residual: torch.Tensor
    remaining_residual: torch.Tensor

    def zero_(self) -> None:
        self.first_residual.zero_()
        self.remaining_residual.zero_()


class _Session:
    def __init__(self, threshold: float, collective=None):
        self.threshold = float(threshold)
        self.collective = collective  # context parallelism: sums over the whole split sequence (RunContext)
        self.stats = CacheStats(threshold=self.threshold)
        self.branches: dict[tuple, _BranchState] = {}
        # Under graphs: the slot of each conditioning branch (in order of first appearance), the (call shape, slot)
        # pairs whose StaticRefs hold a reference of *this* request, and the StaticRefs this request used.
        self.slots: dict[tuple, int] = {}
        self.have_ref: set[tuple] = set()
        self.used: dict[tuple, StaticRefs] = {}
        self.overflow: set[tuple] = set()  # branches beyond GRAPH_SLOTS: computed every call


class _Head(NamedTuple):
    """What the first block leaves for the rest of the call (the head graph's output, the tail's and skip's input)."""

    hidden: torch.Tensor  # image stream after transformer_blocks[0]
    encoder: torch.Tensor  # text stream after it
    temb: torch.Tensor
    rotary: Any  # image_rotary_emb: (cos, sin)
    first_residual: torch.Tensor  # hidden - hidden before the first block


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
        self._static: dict[tuple, StaticRefs] = {}  # (call shape, slot) -> buffers captured graphs use
        self._head_reference: torch.Tensor | None = None  # set while graph_head calls the transformer
        self._passthrough = False  # set while the whole-step graph's work calls the transformer
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
        new._static = {}
        new._head_reference = None
        new._passthrough = False
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

    @property
    def threshold(self) -> float | None:
        """The active session's threshold (None outside a session)."""
        return self._session.threshold if self._session is not None else None

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
        """Activate the cache for one request. Yields the live CacheStats; all cached tensors are dropped on exit,
        and the static reference buffers graphs used are zeroed.

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
                with torch.inference_mode():  # the buffers were made inside the pipeline's inference mode
                    for refs in sess.used.values():
                        refs.zero_()  # nothing of this request stays in the buffers graphs keep
                sess.used.clear()
                sess.have_ref.clear()
        finally:
            self._lock.release()

    # ------------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def passthrough(self):
        """Calls inside run the transformer's own forward, session or not (the whole-step graph's work)."""
        before, self._passthrough = self._passthrough, True
        try:
            yield
        finally:
            self._passthrough = before

    def _forward(self, *args, **kwargs):
        if self._passthrough:
            return self._original_forward(*args, **kwargs)
        if self._head_reference is not None:  # graph_head: the head piece, through nn.Module.__call__'s hooks
            return _head_forward(self.transformer, *args, _reference=self._head_reference, **kwargs)
        sess = self._session
        if sess is None:
            return self._original_forward(*args, **kwargs)  # exact passthrough
        return _cached_forward(self.transformer, *args, _fbc_session=sess, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # The pieces captured graphs are made of (optimizations/cuda_graphs.py), and the host's decision between them
    # ------------------------------------------------------------------------------------------------------------
    def graph_slot(self, encoder_hidden_states: torch.Tensor, call_key: tuple) -> tuple | None:
        """The (call shape, branch slot) of this call in the active session, or None for a branch beyond
        GRAPH_SLOTS (run it uncached). `encoder_hidden_states`: the caller's tensor (the branch's identity)."""
        sess = self._require_session()
        if sess.collective is not None:
            raise NotImplementedError("captured graphs do not run under context parallelism")
        sess.stats.graphed = True
        branch = _branch_key(encoder_hidden_states)
        slot = sess.slots.get(branch)
        if slot is None:
            if len(sess.slots) >= GRAPH_SLOTS:
                if not sess.overflow:
                    log.warning("first-block cache under graphs: more than %d conditioning branches in one request; "
                                "the others are computed every call", GRAPH_SLOTS)
                sess.overflow.add(branch)
                return None
            slot = sess.slots[branch] = len(sess.slots)
        return (call_key, slot)

    def static_refs(self, slot: tuple, hidden_states: torch.Tensor) -> StaticRefs:
        """The slot's reference buffers (made, zeroed, on first use; then the same tensors for every request).
        Shaped like the first block's residual: (batch, image-stream tokens, inner dim), the model's dtype."""
        refs = self._static.get(slot)
        if refs is None:
            t = self.transformer
            shape = (hidden_states.shape[0], hidden_states.shape[1], t.inner_dim)
            refs = self._static[slot] = StaticRefs(*(torch.zeros(shape, dtype=t.dtype, device=hidden_states.device)
                                                     for _ in range(2)))
        self._require_session().used[slot] = refs
        return refs

    def graph_head(self, static: dict) -> tuple[_Head, torch.Tensor]:
        """The head graph's work: `static` holds the transformer's keyword arguments and "reference" (the slot's
        StaticRefs.first_residual). Runs through the transformer's `nn.Module.__call__`, so its forward pre-hooks run
        (the modulation table's row lookup is captured with it). Returns the _Head and rel as a device scalar."""
        kwargs = {k: v for k, v in static.items() if k != "reference"}
        self._head_reference = static["reference"]
        try:
            return self.transformer(**kwargs)
        finally:
            self._head_reference = None

    def graph_tail(self, static: dict) -> torch.Tensor:
        """The tail graph's work: `static` = {"head": the head graph's output _Head, "refs": StaticRefs}. The
        remaining blocks, then this call's references into the buffers, then norm_out and proj_out."""
        head, refs = static["head"], static["refs"]
        hidden = _remaining(self.transformer, head, None)
        refs.first_residual.copy_(head.first_residual)
        refs.remaining_residual.copy_(hidden - head.hidden)
        return _finish(self.transformer, hidden, head.temb)

    def graph_skip(self, static: dict) -> torch.Tensor:
        """The skip path's work: the hidden state after the first block plus the cached residual, norm_out, proj_out."""
        head, refs = static["head"], static["refs"]
        return _finish(self.transformer, head.hidden + refs.remaining_residual, head.temb)

    def graph_decide(self, slot: tuple, rel: torch.Tensor) -> bool:
        """Skip this call? The eager cache's rule: never without a reference of this request (or at threshold 0),
        else `rel < threshold` with rel read to the host (the one sync of a call; see cuda_graphs.py for its cost)."""
        sess = self._require_session()
        if sess.threshold <= 0 or slot not in sess.have_ref:
            return False
        return _decide(sess, rel)

    def graph_done(self, slot: tuple | None, skipped: bool) -> None:
        """Count the call; a computed one refreshed its slot's reference (the tail wrote it)."""
        sess = self._require_session()
        if skipped:
            sess.stats.skipped += 1
        else:
            sess.stats.computed += 1
            if slot is not None and sess.threshold > 0:
                sess.have_ref.add(slot)

    def _require_session(self) -> _Session:
        if self._session is None:
            raise RuntimeError("no FirstBlockCache session is active")
        return self._session


def installed_cache(module) -> FirstBlockCache | None:
    """The FirstBlockCache installed on this transformer instance, if any (installs nothing)."""
    owner = getattr(vars(module).get("forward"), "__self__", None)
    return owner if isinstance(owner, FirstBlockCache) else None


def _branch_key(encoder_hidden_states: torch.Tensor) -> tuple:
    # See module docstring: the pipeline reuses the same embeds tensor per branch for the whole loop.
    return (
        encoder_hidden_states.data_ptr(),
        tuple(encoder_hidden_states.shape),
        encoder_hidden_states.dtype,
        encoder_hidden_states.device,
    )


def relative_change(first_residual: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """rel = mean|r - r_ref| / mean|r_ref|, a device scalar (NaN or inf for an all-zero reference: never skips)."""
    return (first_residual - reference).abs().mean() / reference.abs().mean()


def _decide(sess: _Session, rel: torch.Tensor) -> bool:
    # `.item()` is a host sync: the skip decision changes which kernels are launched next, so it is inherent to
    # the method (diffusers' and para-attn's FBCache sync here too).
    value = rel.item()
    sess.stats.diffs.append(value)
    return value < sess.threshold  # NaN / inf (e.g. an all-zero reference) never skip


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
        rel = relative_change(first_residual, prev)
    return _decide(sess, rel)


def _check_supported(controlnet_block_samples, controlnet_single_block_samples, joint_attention_kwargs) -> None:
    if controlnet_block_samples is not None or controlnet_single_block_samples is not None:
        raise NotImplementedError("FirstBlockCache does not support ControlNet residuals")
    if joint_attention_kwargs is not None and "ip_adapter_image_embeds" in joint_attention_kwargs:
        raise NotImplementedError("FirstBlockCache does not support IP-Adapter image embeds")


def _run_block(self, block, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs):
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


def _head(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance,
          joint_attention_kwargs) -> _Head:
    """FluxTransformer2DModel.forward (diffusers 0.42.1) up to and including the first double-stream block."""
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

    # --- first double-stream block: always runs ---------------------------------------------------------------
    hidden_states_before = hidden_states
    encoder_hidden_states, hidden_states = _run_block(self, self.transformer_blocks[0], hidden_states,
                                                      encoder_hidden_states, temb, image_rotary_emb,
                                                      joint_attention_kwargs)
    return _Head(hidden_states, encoder_hidden_states, temb, image_rotary_emb, hidden_states - hidden_states_before)


def _remaining(self, head: _Head, joint_attention_kwargs) -> torch.Tensor:
    """The remaining double blocks and all single blocks; the image stream's hidden state after the last one."""
    encoder_hidden_states, hidden_states = head.encoder, head.hidden
    for block in self.transformer_blocks[1:]:
        encoder_hidden_states, hidden_states = _run_block(self, block, hidden_states, encoder_hidden_states,
                                                          head.temb, head.rotary, joint_attention_kwargs)
    for block in self.single_transformer_blocks:
        encoder_hidden_states, hidden_states = _run_block(self, block, hidden_states, encoder_hidden_states,
                                                          head.temb, head.rotary, joint_attention_kwargs)
    return hidden_states


def _finish(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    hidden_states = self.norm_out(hidden_states, temb)
    return self.proj_out(hidden_states)


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
    """Mirror of FluxTransformer2DModel.forward (diffusers 0.42.1) with the first-block cache: _head, the decision,
    then _remaining (computed) or the cached residual (skipped), then _finish.

    Decorated with the same `apply_lora_scale` as the original, so PEFT LoRA scaling behaves identically.
    """
    sess = _fbc_session
    _check_supported(controlnet_block_samples, controlnet_single_block_samples, joint_attention_kwargs)

    key = _branch_key(encoder_hidden_states)  # before context_embedder replaces the name
    head = _head(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance,
                 joint_attention_kwargs)

    state = sess.branches.get(key)
    if _should_skip(sess, state, head.first_residual):
        # Remaining double blocks and all single blocks replaced by the cached residual of the image stream.
        hidden_states = head.hidden + state.remaining_residual
        sess.stats.skipped += 1
    else:
        hidden_states = _remaining(self, head, joint_attention_kwargs)
        if sess.threshold > 0:  # threshold 0 never reads the cache: keep no tensors
            sess.branches[key] = _BranchState(
                first_residual=head.first_residual,
                remaining_residual=hidden_states - head.hidden,
            )
        sess.stats.computed += 1

    output = _finish(self, hidden_states, head.temb)

    if not return_dict:
        return (output,)

    return Transformer2DModelOutput(sample=output)


@apply_lora_scale("joint_attention_kwargs")
def _head_forward(
    self,
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
    _reference: torch.Tensor,
) -> tuple[_Head, torch.Tensor]:
    """The head piece for a graph (FirstBlockCache.graph_head): _head, and rel against `_reference` on the device."""
    _check_supported(controlnet_block_samples, controlnet_single_block_samples, joint_attention_kwargs)
    if joint_attention_kwargs:
        raise NotImplementedError("the first-block cache under CUDA graphs takes no joint_attention_kwargs")
    head = _head(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance,
                 None)
    if _reference.shape != head.first_residual.shape or _reference.dtype != head.first_residual.dtype:
        raise RuntimeError(f"first-block cache: reference buffer {tuple(_reference.shape)} {_reference.dtype} does "
                           f"not match the residual {tuple(head.first_residual.shape)} {head.first_residual.dtype}")
    return head, relative_change(head.first_residual, _reference)
