"""CUDA graphs for the denoising step, the text encoders and the VAE: capture each call once per input shape, then
replay it.

Replaying removes the CPU launch overhead of ~thousands of kernels per step. Shapes are static per graph, so a
graph is captured per (shape, dtype) key; all graphs share one memory pool. The first call at a new shape
captures (and, on a compiled transformer, compiles): the service runs it as a reported warm-up, outside the
request's timing. Not combinable with the first-block cache, whose skip decision is data-dependent.

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
from optimizations.modulation_table import before_replay


class _GraphCache:
    """Graphs captured per input key, all in one memory pool. `_entry` captures on a key's first use: `run` is called
    on clones of the inputs (the static buffers each replay copies new inputs into), twice on a side stream as
    capture requires (this also compiles compiled code), then once under capture."""

    def __init__(self, pool=None):
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.graphs: dict = {}  # key -> (graph, static inputs, static output)
        self.capture_ms: dict = {}

    def _entry(self, key, inputs, run: Callable):
        entry = self.graphs.get(key)
        if entry is None:
            t0 = time.perf_counter()
            if isinstance(inputs, dict):
                static = {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
            else:
                static = inputs.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    run(static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = run(static)
            torch.cuda.synchronize()
            entry = self.graphs[key] = (graph, static, out)
            self.capture_ms[key] = (time.perf_counter() - t0) * 1000
        return entry


class CudaGraphTransformer(_GraphCache):
    """Callable stand-in for the transformer: same call signature, replays a captured graph per shape."""

    def __init__(self, module, pool=None):
        self.module = module  # first: __getattr__ reads it
        super().__init__(pool)
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
        graph, static, out = self._entry(key, kwargs, lambda static: self.module(**static)[0])
        before_replay(self.module, kwargs)  # host-side work the module's pre-hooks would do (none run on replay)
        for k, v in kwargs.items():
            if torch.is_tensor(v):
                static[k].copy_(v)
        graph.replay()
        # Clone: with true CFG the same graph runs twice per step and would overwrite the first result.
        return (out.clone(),)


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

    def __init__(self, module, pool=None):
        super().__init__(pool)
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

    def __init__(self, fn: Callable, pool=None):
        super().__init__(pool)
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

    def __init__(self):
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
        self.pool = torch.cuda.graph_pool_handle()
        return ("transformer step, text encoders (T5, CLIP) and VAE encode / decode captured per shape on first use "
                "(reported as warm-up), replayed after")

    def refresh(self, components: Components) -> None:
        """Other optimisations changed the modules: graphs captured before would replay the old code."""
        self.transformers.clear()
        self.text_encoders.clear()
        self.vae.clear()

    @contextlib.contextmanager
    def activate(self, run: RunContext):
        runner = self.transformers.get(run.precision)
        if runner is None:
            runner = self.transformers[run.precision] = CudaGraphTransformer(run.variant, self.pool)
        run.transformer = runner
        runner.extra_key = tuple(run.graph_key)
        key = (run.vae_encode, run.vae_decode)  # eager or compiled: captured apart
        vae = self.vae.get(key)
        if vae is None:
            encode, decode = key
            vae = self.vae[key] = (CudaGraphCall(lambda x: encode(x).latent_dist.parameters, self.pool),
                                   CudaGraphCall(lambda z: decode(z, return_dict=False)[0], self.pool))
        run.vae_encode, run.vae_decode = vae_encode_from_moments(vae[0]), vae_decode_from_pixels(vae[1])
        with contextlib.ExitStack() as stack:  # each encoder's forward replays its graph (timing hooks stay)
            for attr in ("text_encoder", "text_encoder_2"):
                if attr in getattr(run.components, "offloaded", {}):  # streamed in by hooks (memory budget): eager
                    continue
                encoder = self.text_encoders.get(attr)
                if encoder is None:
                    encoder = self.text_encoders[attr] = CudaGraphEncoder(getattr(run.components.pipe, attr),
                                                                          self.pool)
                stack.enter_context(encoder.installed())
            stack.callback(setattr, runner, "extra_key", ())
            yield
