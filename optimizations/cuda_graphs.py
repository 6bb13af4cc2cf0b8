"""CUDA graphs for the denoising step, the text encoders and the VAE: capture each call once per input shape, then
replay it.

Replaying removes the CPU launch overhead of ~thousands of kernels per step. Shapes are static per graph, so a
graph is captured per (shape, dtype) key; all graphs share one memory pool. The first call at a new shape
captures (and, on a compiled transformer, compiles): the service runs it as a reported warm-up, outside the
request's timing. How a graph is captured is a strategy (optimizations/graph_capture.py): CUDA capture here, a
recorded stand-in that keeps the same static-buffer discipline in the CPU tests.

With the first-block cache in the same request, a transformer call is three graphs per call shape and conditioning
branch instead of one (caching/first_block_cache.py has the pieces): the *head* (embedders, rotary, modulation
lookup, the first block, and the relative change `rel` of the first block's residual as a device scalar), then,
chosen by the host, the *tail* (the remaining blocks, norm_out, proj_out; it refreshes the branch's reference
buffers) or the *skip* path (the first block's output plus the cached residual, norm_out, proj_out). The host reads
`rel` once per call: one sync per step, which costs the step little because the step is milliseconds of GPU work,
the head's replay is already queued when the host waits, and what follows is a single replay launched at once
(the launch overhead the graphs remove was thousands of kernel launches, not one wait). All three are captured at a
call shape's first cached call (the request's warm-up), the skip path too, so a later first skip captures nothing
on the request's time. Under the cache at threshold 0 the same graphs run and nothing is ever skipped: bit-identical
to one whole-step graph (tested).

The text encoders get the same treatment because the pipeline pads every prompt to a fixed length (512 T5 tokens,
77 CLIP tokens): one graph per encoder serves every request. A replay is one launch instead of hundreds: it helps
the host-bound CLIP most; T5 is GPU-bound, so the graph removes only its launch cost (bench/bench_text_encoder.py).
Bit-identical to eager (tested).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

from optimizations.base import Components, DeviceInfo, Optimization, RunContext
from optimizations.caching.first_block_cache import installed_cache
from optimizations.graph_capture import CudaCapture
from optimizations.modulation_table import before_replay


class _GraphCache:
    """Graphs captured per input key, all in one memory pool. `_entry` captures on a key's first use with the capture
    strategy (graph_capture.py): `run` is called on the static inputs (by default clones of the first call's
    inputs, which each replay copies new inputs into)."""

    def __init__(self, pool=None, capture=None):
        self.capture = capture if capture is not None else CudaCapture()
        self.pool = pool if pool is not None else self.capture.new_pool()
        self.graphs: dict = {}  # key -> (graph, static inputs, static output)
        self.capture_ms: dict = {}

    def _entry(self, key, inputs, run: Callable, clone: bool = True):
        """The (graph, static inputs, static output) of `key`, captured now if new. `clone=False`: `inputs` are the
        static buffers themselves (another graph's outputs, buffers kept elsewhere), captured at their addresses, or
        a function making them (called only when the key is new)."""
        entry = self.graphs.get(key)
        if entry is None:
            t0 = time.perf_counter()
            static = _static_copy(inputs) if clone else inputs() if callable(inputs) else inputs
            graph, out = self.capture(run, static, self.pool)
            entry = self.graphs[key] = (graph, static, out)
            self.capture_ms[key] = (time.perf_counter() - t0) * 1000
        return entry


def _static_copy(inputs):
    if isinstance(inputs, dict):
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
    return inputs.clone()


def _copy_inputs(static: dict, kwargs: dict) -> None:
    for k, v in kwargs.items():
        if torch.is_tensor(v):
            static[k].copy_(v)


class CudaGraphTransformer(_GraphCache):
    """Callable stand-in for the transformer: same call signature, replays a captured graph per shape; with an
    active first-block cache session on the module, the cache's head / tail / skip graphs (module docstring)."""

    def __init__(self, module, pool=None, capture=None):
        self.module = module  # first: __getattr__ reads it
        super().__init__(pool, capture)
        self.extra_key: tuple = ()  # the request's RunContext.graph_key (set by CudaGraphs.activate)

    def __getattr__(self, name):  # config, dtype, ... come from the wrapped transformer
        return getattr(self.module, name)

    @staticmethod
    def _key(kwargs):
        return tuple((k, tuple(v.shape), v.dtype) if torch.is_tensor(v) else (k, repr(v))
                     for k, v in sorted(kwargs.items()))

    def __call__(self, **kwargs):
        kwargs.setdefault("return_dict", False)
        key = self._key(kwargs) + self.extra_key  # a graph per call shape and per what else changes the call
        cache = installed_cache(self.module)
        if cache is not None and cache.active:
            out = self._cached_call(cache, key, kwargs)
            if out is not None:
                return (out,)
        graph, static, out = self._entry(key, kwargs, self._whole_step)
        before_replay(self.module, kwargs)  # host-side work the module's pre-hooks would do (none run on replay)
        _copy_inputs(static, kwargs)
        graph.replay()
        if cache is not None and cache.active:
            cache.graph_done(None, skipped=False)  # a branch beyond the cache's slots: computed, uncached
        # Clone: with true CFG the same graph runs twice per step and would overwrite the first result.
        return (out.clone(),)

    def _whole_step(self, static: dict) -> torch.Tensor:
        """The uncached step (the work of the whole-step graph), with an installed cache passing through."""
        cache = installed_cache(self.module)
        with cache.passthrough() if cache is not None else contextlib.nullcontext():
            return self.module(**static)[0]

    def _cached_call(self, cache, key: tuple, kwargs: dict):
        """One call under the first-block cache: replay the head, read rel (one sync), replay the tail or the skip
        path. The head's outputs are read by the tail / skip replay that follows at once, before any other graph
        of the pool replays (graph_capture.py). None: this branch has no slot (run the whole-step graph)."""
        slot = cache.graph_slot(kwargs["encoder_hidden_states"], key)
        if slot is None:
            return None
        refs = cache.static_refs(slot, kwargs["hidden_states"])
        tag = ("first_block_cache",) + slot
        head_graph, head_static, (head, rel) = self._entry(  # the call's inputs cloned; the reference buffer as is
            tag + ("head",), lambda: dict(_static_copy(kwargs), reference=refs.first_residual), cache.graph_head,
            clone=False)
        if head_static["reference"] is not refs.first_residual:
            raise RuntimeError("first-block cache: the head graph reads another reference buffer than its slot's")
        before_replay(self.module, kwargs)  # the modulation table's rows (its lookup is in the head graph)
        _copy_inputs(head_static, kwargs)
        head_graph.replay()
        # Both captured at the slot's first call, after the head's replay (their warm-up runs read its outputs).
        pieces = {"head": head, "refs": refs}
        tail = self._entry(tag + ("tail",), pieces, cache.graph_tail, clone=False)
        skip = self._entry(tag + ("skip",), pieces, cache.graph_skip, clone=False)
        skipped = cache.graph_decide(slot, rel)
        graph, _, out = skip if skipped else tail
        graph.replay()
        cache.graph_done(slot, skipped)
        return out.clone()


def _clone_output(out):
    """A copy of a transformers ModelOutput whose tensors no later replay can overwrite (with true CFG the negative
    prompt replays the same graph)."""
    return type(out)(**{k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()})


class CudaGraphEncoder(_GraphCache):
    """A text encoder's (T5 or CLIP) forward, replayed per token shape: `encoder(input_ids, **kwargs)`.

    `installed()` makes it the encoder's forward for one request, so the encoder stays the pipeline's nn.Module:
    diffusers finds the pipeline's execution device among its components' modules (with the transformer and the VAE
    behind the service's timing stand-ins, the text encoders are the modules it finds), and the service's timing
    hooks time the replay as they time an eager call. Captures run the class's forward directly: no hook records a
    timing event inside a capture."""

    def __init__(self, module, pool=None, capture=None):
        super().__init__(pool, capture)
        self.module = module
        self.eager_forward = type(module).forward.__get__(module)

    @contextlib.contextmanager
    def installed(self):
        self.module.forward = self
        try:
            yield self
        finally:
            del self.module.forward

    def __call__(self, input_ids, **kwargs):
        key = (tuple(input_ids.shape), input_ids.dtype, str(input_ids.device), tuple(sorted(
            (k, repr(v)) for k, v in kwargs.items())))
        graph, static, out = self._entry(key, input_ids, lambda static: self.eager_forward(static, **kwargs))
        static.copy_(input_ids)
        graph.replay()
        return _clone_output(out)


class CudaGraphCall(_GraphCache):
    """One tensor in, one tensor out (the VAE's encode to moments, its decode to pixels), replayed per input shape.

    Why the VAE: compiled, its encoder is host-bound at 512x512: a whole-request profile showed the GPU idle between
    its kernels (tools/profile_request.py)."""

    def __init__(self, fn: Callable, pool=None, capture=None):
        super().__init__(pool, capture)
        self.fn = fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        graph, static, out = self._entry((tuple(x.shape), x.dtype, str(x.device), x.stride()), x, self.fn)
        static.copy_(x)
        graph.replay()
        return out.clone()


def vae_encode_from_moments(moments: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """`vae.encode`'s interface over a function returning the encoder's moments (mean and log-variance stacked on
    the channel axis). A graph's output must be a tensor, not diffusers' distribution object. So the distribution is
    rebuilt here from the moments, as `AutoencoderKL.encode` builds it (a chunk, a clamp and two exps)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput

    def encode(x: torch.Tensor, return_dict: bool = True):
        posterior = DiagonalGaussianDistribution(moments(x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    return encode


def vae_decode_from_pixels(pixels: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """`vae.decode`'s interface over a function returning the decoded image tensor."""
    from diffusers.models.autoencoders.vae import DecoderOutput

    def decode(z: torch.Tensor, return_dict: bool = True, generator=None):
        sample = pixels(z)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    return decode


class CudaGraphs(Optimization):
    name, flag, load_time = "cuda_graphs", "use_cuda_graphs", False
    needs_warmup = in_warm_key = True  # captured per shape on first use
    offload_conflict = ("CUDA graphs replay fixed weight addresses, and the offload hooks move the weights in and out "
                        "on every call")

    def __init__(self, capture=None):
        # How graphs are captured (graph_capture.py): CUDA capture; the CPU tests put a RecordedCapture here.
        self.capture = capture if capture is not None else CudaCapture()
        self.pool = None
        self.transformers: dict[str, CudaGraphTransformer] = {}  # precision -> runner
        self.text_encoders: dict[str, CudaGraphEncoder] = {}  # pipeline attribute -> runner
        self.vae: dict[tuple, tuple[CudaGraphCall, CudaGraphCall]] = {}  # (encode, decode) -> their runners

    def available(self, device: DeviceInfo) -> str | None:
        if not device.is_cuda:
            return "CUDA graphs need a CUDA GPU"
        if device.context_parallel > 1:
            return (f"not with context parallelism ({device.context_parallel} ranks): each step's collectives, the "
                    "ranks' agreement between calls and the host-side sequence split are not captured")
        return None

    def prepare(self, components: Components) -> str:
        self.pool = self.capture.new_pool()
        return ("transformer step, text encoders (T5, CLIP) and VAE encode / decode captured per shape on first use "
                "(reported as warm-up), replayed after; with the first-block cache the step is three graphs (first "
                "block + decision scalar, remaining blocks, skip path) and the host picks one per step")

    def refresh(self, components: Components) -> None:
        """Other optimisations changed the modules: graphs captured before would replay the old code."""
        self.transformers.clear()
        self.text_encoders.clear()
        self.vae.clear()

    @contextlib.contextmanager
    def activate(self, run: RunContext):
        runner = self.transformers.get(run.precision)
        if runner is None:
            runner = self.transformers[run.precision] = CudaGraphTransformer(run.variant, self.pool,
                                                                                     self.capture)
        run.transformer = runner
        runner.extra_key = tuple(run.graph_key)
        key = (run.vae_encode, run.vae_decode)  # eager or compiled: captured apart
        vae = self.vae.get(key)
        if vae is None:
            encode, decode = key
            vae = self.vae[key] = (CudaGraphCall(lambda x: encode(x).latent_dist.parameters, self.pool, self.capture),
                                   CudaGraphCall(lambda z: decode(z, return_dict=False)[0], self.pool, self.capture))
        run.vae_encode, run.vae_decode = vae_encode_from_moments(vae[0]), vae_decode_from_pixels(vae[1])
        with contextlib.ExitStack() as stack:  # each encoder's forward replays its graph (timing hooks stay)
            for attr in ("text_encoder", "text_encoder_2"):
                if attr in getattr(run.components, "offloaded", {}):  # streamed in by hooks (memory budget): eager
                    continue
                encoder = self.text_encoders.get(attr)
                if encoder is None:
                    encoder = self.text_encoders[attr] = CudaGraphEncoder(getattr(run.components.pipe, attr),
                                                                          self.pool, self.capture)
                stack.enter_context(encoder.installed())
            stack.callback(setattr, runner, "extra_key", ())
            yield
