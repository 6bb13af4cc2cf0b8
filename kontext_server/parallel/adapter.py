"""One transformer call split over the context-parallel group: each rank runs 1/N of the tokens.

What: `SequenceSplit.wrap(run)` (entered by the runner around the pipeline call, outside every optimisation) makes
`run.transformer` a `SplitCall`. Each call:
  1. syncs with the other ranks (group.check: a rank that failed or a cancel on rank 0 ends the job here);
  2. pads the image stream (latents + reference latents) and the text stream each to a multiple of N when they do not
     divide, and masks the padded keys out of attention (so the result is the one-process result);
  3. gives this rank its chunk of each stream (and of their position ids: RoPE is applied per token, locally);
  4. runs the wrapped transformer under para-attn's `UnifiedAttnMode`, which turns every SDPA call into Ulysses
     (all-to-all over heads) and / or ring attention over the mesh;
  5. gathers the output tokens from all ranks and drops the padding.
Why our own split and not para-attn's `parallelize_pipe`: its Flux adapter asserts that each stream divides by N, and
it patches the pipeline *class* (every instance) and the transformer for good; here the split exists for one call and
leaves the modules as they were (the optimisation contract), and a shape that does not divide is padded.
It is also the `collective` the optimisations see in `RunContext`: `reduce_token_sums` sums tensors over the image
tokens this rank holds (padding excluded) and over all ranks, so the first-block cache takes its skip decision from
the whole sequence, identically on every rank (para-attn's own cache all-reduces its difference the same way).
Contract: ranks call the transformer the same number of times with the same shapes (same request, same seed, same
plan, an agreed cache decision); rank-dependent work happens only inside the attention's collectives.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from kontext_server.parallel.group import Group


def chunk_sizes(length: int, n: int) -> tuple[int, int]:
    """(tokens per rank, padding added) for a stream of `length` tokens over `n` ranks."""
    per = math.ceil(length / n)
    return per, per * n - length


def ring_problem(degree: int, ring: int, text: int, image: int) -> str | None:
    """Why a request of `text` + `image` tokens cannot run with ring attention over `ring` ranks (None: it can):
    padding needs a key mask, which ring attention does not take."""
    if ring <= 1 or (text % degree == 0 and image % degree == 0):
        return None
    return (f"{text} text + {image} image tokens do not divide by {degree} ranks, and ring attention (ring degree "
            f"{ring}) takes no mask for padding: choose a size whose image tokens divide, or ring degree 1")


def key_mask(n: int, text: int, text_per: int, image: int, image_per: int, device) -> torch.Tensor:
    """Which keys attention may use, in the order the Ulysses all-to-all gathers them: rank by rank, each rank's
    text chunk then its image chunk. Shape (1, 1, 1, n * (text_per + image_per)), True where a token is real."""
    ranks = torch.arange(n, device=device)[:, None]
    txt = ranks * text_per + torch.arange(text_per, device=device)[None, :] < text
    img = ranks * image_per + torch.arange(image_per, device=device)[None, :] < image
    return torch.cat([txt, img], dim=1).reshape(1, 1, 1, -1)


class SequenceSplit:
    """The context-parallel call of a service's transformer, and the reductions its optimisations need."""

    def __init__(self, group: Group):
        self.group = group
        self.valid_rows = None  # image tokens of this rank's chunk that are not padding (the current call's)
        self.last_padding: dict[str, int] = {"text": 0, "image": 0}
        self.inject = None  # tests only (FLUX_CP_FAIL_AT ...:inside): an exception to raise inside a call, or None

    @property
    def degree(self) -> int:
        return self.group.split.degree

    def reduce_token_sums(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Sums of (batch, tokens, channels) tensors over this rank's real image tokens, added over all ranks:
        one float32 tensor of len(tensors) sums (what a one-process sum over the whole sequence gives)."""
        rows = self.valid_rows if self.valid_rows is not None else tensors[0].shape[1]
        sums = torch.stack([t[:, :rows].float().sum() for t in tensors])
        dist.all_reduce(sums, group=self.group.seq_group)
        return sums

    @contextlib.contextmanager
    def wrap(self, run):
        """For one pipeline call: the transformer is called split over the group."""
        inner = run.transformer
        run.transformer = SplitCall(inner, self)
        try:
            yield
        finally:
            run.transformer = inner
            self.valid_rows = None


class SplitCall:
    """Stand-in for the transformer with the same keyword-call interface (what FluxKontextPipeline calls)."""

    def __init__(self, inner, split: SequenceSplit):
        self.inner, self.split = inner, split
        self._text_chunks: dict = {}  # one request's padded text chunk per embeds tensor (stable cache branch key)

    def __getattr__(self, name):  # config, dtype, ... from the wrapped transformer
        return getattr(self.inner, name)

    def _text_chunk(self, ehs: torch.Tensor, txt_ids: torch.Tensor, n: int, r: int, per: int, pad: int):
        if pad == 0:  # a view of the pipeline's own embeds: the first-block cache keys branches on its address
            return ehs.narrow(1, r * per, per), txt_ids.narrow(0, r * per, per)
        key = (ehs.data_ptr(), tuple(ehs.shape))
        if key not in self._text_chunks:
            e = torch.nn.functional.pad(ehs, (0, 0, 0, pad))
            ids = torch.nn.functional.pad(txt_ids, (0, 0, 0, pad))
            self._text_chunks[key] = (ehs, e.narrow(1, r * per, per), ids.narrow(0, r * per, per))
        return self._text_chunks[key][1:]

    def __call__(self, *args, **kw):
        from para_attn.para_attn_interface import UnifiedAttnMode

        if args:
            raise TypeError("the context-parallel transformer call takes keyword arguments only")
        group = self.split.group
        group.check()  # every rank here, or the job ends now on all of them
        failure = self.split.inject() if self.split.inject is not None else None
        if failure is not None:  # past the check: the other ranks wait for this one in the attention's collectives
            raise failure
        n, r = group.split.degree, group.seq_rank
        hs, ehs = kw["hidden_states"], kw["encoder_hidden_states"]
        img_ids, txt_ids = kw["img_ids"], kw["txt_ids"]
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        image, text = hs.shape[1], ehs.shape[1]
        image_per, image_pad = chunk_sizes(image, n)
        text_per, text_pad = chunk_sizes(text, n)
        self.split.last_padding = {"text": text_pad, "image": image_pad}
        jak = dict(kw.get("joint_attention_kwargs") or {})
        if image_pad or text_pad:
            problem = ring_problem(n, group.split.ring, text, image)
            if problem:  # the planner refuses such a request first (ParallelService.plan)
                raise ValueError(problem)
            hs = torch.nn.functional.pad(hs, (0, 0, 0, image_pad))
            img_ids = torch.nn.functional.pad(img_ids, (0, 0, 0, image_pad))
            jak["attention_mask"] = key_mask(n, text, text_per, image, image_per, hs.device)
        e_chunk, t_chunk = self._text_chunk(ehs, txt_ids, n, r, text_per, text_pad)
        local = dict(kw, hidden_states=hs.narrow(1, r * image_per, image_per), encoder_hidden_states=e_chunk,
                     img_ids=img_ids.narrow(0, r * image_per, image_per), txt_ids=t_chunk,
                     joint_attention_kwargs=jak or kw.get("joint_attention_kwargs"))
        self.split.valid_rows = max(0, min(image_per, image - r * image_per))
        with UnifiedAttnMode(group.mesh):
            out = self.inner(**local)
        as_tuple = isinstance(out, tuple)
        sample = out[0] if as_tuple else out.sample
        full = _gather_tokens(sample, group.seq_group, n)[:, :image]
        if as_tuple:
            return (full, *out[1:])
        return type(out)(sample=full)


def _gather_tokens(x: torch.Tensor, group, n: int) -> torch.Tensor:
    """(batch, tokens, channels) chunks of all ranks, concatenated along the tokens in rank order."""
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)
