"""Running one request: the pipeline call under the optimisations its plan applies, timed per stage.

What: `Runner.generate` builds a `RunContext`, lets each applied optimisation `configure` it (transformer variant,
default steps) and `activate` around the call (in stack order; prepared-but-not-applied ones `bypass`), swaps timing
stand-ins for the transformer and the VAE into the pipeline for that call only, and returns a `GenerationResult`.
The first call at a shape that compiles or captures runs first as a short warm-up, reported as `cold_start` and
never counted in `total`. An optional `on_step` hook sees every denoising step (steps.py: StepEvent, previews).
Contract: worker thread only (one owner of the device); nothing here names a particular optimisation.
"""
from __future__ import annotations

import contextlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from PIL import Image

from kontext_server.request import DEFAULT_STEPS, MAX_SEED, InferenceRequest
from kontext_server.service.steps import StepEvent, StepProbe
from optimizations.base import Decision, RunContext
from optimizations.registry import STACK_ORDER
from kontext_server.service.references import more_references
from kontext_server.service.sizes import as_references, image_notes, reference_notes, reference_sizes, request_size
from utils import StageTimer

STAGES = ("text_encode", "image_encode", "transformer", "vae_decode")


@dataclass
class GenerationResult:
    images: list  # PIL images (or numpy arrays with output_type="np")
    seed: int
    width: int
    height: int
    steps: int
    steps_computed: int
    steps_skipped: int
    timings_ms: dict[str, float]
    optimizations: dict[str, Decision]
    warnings: list[str]
    latents: Any = None  # final packed latents (for fidelity checks; not sent over HTTP)
    replica: str | None = None  # which Ray Serve replica ran it (set by kontext_server/serving/ray_serve; None locally)
    parallel: dict | None = None  # context parallelism: degree, attention split, padding (kontext_server/parallel)
    loras: list = field(default_factory=list)  # the LoRA adapters that ran: name, scale, rank
    size_reason: str = ""  # why the output has its size (service/sizes.py)
    references: int = 0  # reference images the model saw
    cache_threshold: float | None = None  # the first-block cache's threshold, when it ran (also in its detail)
    memory_tier: dict | None = None  # under --memory-budget: what of the tier this request met (service.py)


class _Timed:
    """Stand-in for the transformer that times each call; everything else is the wrapped object's. `observer` sees
    each call's inputs, `after` its inputs and output (outside the timed span)."""

    def __init__(self, inner, timer: StageTimer, stage: str, observer: Callable | None = None,
                 after: Callable[[dict, Any], None] | None = None):
        self._inner, self._timer, self._stage, self._observer, self._after = inner, timer, stage, observer, after

    def __call__(self, *args, **kwargs):
        if self._observer is not None:
            self._observer(kwargs)  # the benchmark records real step inputs for its per-step fidelity check
        self._timer.start(self._stage)
        try:
            out = self._inner(*args, **kwargs)
        finally:
            self._timer.stop(self._stage)
        if self._after is not None:
            self._after(kwargs, out)  # the step hook's probe keeps x_t and v for a preview
        return out

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _TimedVAE:
    """Stand-in for the VAE: times encode and decode, and routes each to the function the run chose."""

    def __init__(self, vae, encode_impl: Callable, decode_impl: Callable, timer: StageTimer):
        self._vae, self._encode, self._decode, self._timer = vae, encode_impl, decode_impl, timer

    def encode(self, *args, **kwargs):
        self._timer.start("image_encode")
        try:
            return self._encode(*args, **kwargs)
        finally:
            self._timer.stop("image_encode")

    def decode(self, *args, **kwargs):
        self._timer.start("vae_decode")
        try:
            return self._decode(*args, **kwargs)
        finally:
            self._timer.stop("vae_decode")

    def __getattr__(self, name):
        return getattr(self._vae, name)


def reference_image_tensor(image: Image.Image, width: int, height: int, device) -> torch.Tensor:
    """The reference image as the pipeline's preprocessing leaves it before normalising: (1, 3, H, W) float32 in
    [0, 1], made on `device`. Given a PIL image, diffusers converts it with numpy on the host while the GPU waits;
    here only the uint8 pixels cross to the device and the division is the same float32 operation, so the values
    are identical, and the pipeline normalises the tensor to [-1, 1] as before."""
    if image.size != (width, height):
        # The reference image is encoded at the output size: its tokens line up with the output's.
        image = image.resize((width, height), Image.LANCZOS)
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).to(device)  # (H, W, 3) uint8, a writable copy
    return (pixels.permute(2, 0, 1)[None].to(torch.float32) / 255.0).contiguous()


@contextlib.contextmanager
def _swap(pipe, name: str, value):
    """Use `value` as pipeline component `name` for one call. A plain attribute swap on purpose: the pipeline's
    register_modules bookkeeping (its saved config) must keep naming the real component."""
    old = pipe.__dict__[name]
    pipe.__dict__[name] = value
    try:
        yield
    finally:
        pipe.__dict__[name] = old


def output_size(req: InferenceRequest, image) -> tuple[int, int]:
    """The output size for the request and its reference image(s) (one PIL image, a list of them, or None)."""
    size = request_size(req, image)
    return size.width, size.height


def references_key(req: InferenceRequest, image) -> tuple:
    """The encoded size of each reference image, in order (() without any): the reference tokens' shape."""
    refs = as_references(image)
    return tuple(reference_sizes(refs, *output_size(req, refs))) if refs else ()


def compile_shape(registry: Mapping, req: InferenceRequest, image, plan: Mapping[str, Decision]) -> tuple:
    """What a compiled graph is specialised on: precision, output size, the reference images' encoded sizes (() for
    text-to-image; each extra reference adds its tokens to the sequence), images per prompt."""
    return (Runner.precision(plan, registry), *output_size(req, image), references_key(req, image), req.num_images)


def shape_is_compiled(registry: Mapping, warm_keys: frozenset, shape: tuple) -> bool:
    """Whether a warm run with a shape-compiling optimisation applied has run at `shape` (`warm_keys`: a runner's)."""
    compiling = {n for n, o in registry.items() if o.compiles_per_shape}
    return any(key[0] == shape and compiling & set(key[1]) for key in warm_keys)


class Runner:
    """Runs requests on loaded components with a registry (whose prepared entries `prepared` names)."""

    def __init__(self, components, registry: Mapping, prepared: Mapping[str, str], device: str,
                 synthetic_warning: str | None = None, parallel=None):
        self.components, self.registry, self.prepared, self.device = components, registry, prepared, device
        self.synthetic_warning = synthetic_warning
        # Context parallelism (kontext_server/parallel/adapter.SequenceSplit), None in one process: `wrap(run)` is
        # entered around the pipeline call outside every optimisation (it splits the transformer call over the
        # ranks), and it is the requests' `RunContext.collective`.
        self.parallel = parallel
        # (shape, applied warm-key optimisations, true CFG) already compiled / captured. Replaced, never mutated:
        # the planner reads it from the event loop while the worker adds to it.
        self.warm_keys: frozenset = frozenset()
        self.warmup_ms_total = 0.0
        self.transformer_call_observer: Callable | None = None  # benchmark only: sees each transformer call's kwargs
        self.on_warmed: Callable[[], None] | None = None  # after a warm-up compiled something (saves the cache)
        self._text_timer: StageTimer | None = None
        for enc in (components.pipe.text_encoder, components.pipe.text_encoder_2):
            enc.register_forward_pre_hook(lambda *_: self._text_timer and self._text_timer.start("text_encode"))
            enc.register_forward_hook(lambda *_: self._text_timer and self._text_timer.stop("text_encode"))

    # ---- shapes ---------------------------------------------------------------------------------------------------
    @staticmethod
    def precision(plan: Mapping[str, Decision], registry: Mapping) -> str:
        """The transformer variant a plan runs (what the applied optimisations' configure() choose)."""
        run = RunContext(components=None, request=None, plan=plan)
        for name in STACK_ORDER:
            if plan[name].applied:
                registry[name].configure(run)
        return run.precision

    def compile_shape(self, req: InferenceRequest, image, plan: Mapping[str, Decision]) -> tuple:
        """What a compiled graph is specialised on: precision, output size, edit or not, images per prompt."""
        return compile_shape(self.registry, req, image, plan)

    def warm_key(self, req: InferenceRequest, image, plan: Mapping[str, Decision], graph_key: tuple = ()) -> tuple:
        """What a warm-up compiles / captures for: the shape, the applied warm-key optimisations, true CFG, and the
        request's graph key (e.g. its active LoRA adapter count, which compiled code and graphs depend on)."""
        applied = tuple(n for n in STACK_ORDER if plan[n].applied and self.registry[n].in_warm_key)
        return self.compile_shape(req, image, plan), applied, req.true_cfg_scale > 1.0, tuple(graph_key)

    def shape_is_compiled(self, shape: tuple) -> bool:
        """Whether a warm run with a shape-compiling optimisation applied has run at `shape`."""
        return shape_is_compiled(self.registry, self.warm_keys, shape)

    # ---- one request ------------------------------------------------------------------------------------------------
    def _context(self, req: InferenceRequest, image, plan: Mapping[str, Decision], output_type: str,
                 graph_key: tuple = ()) -> tuple:
        """The RunContext a request starts with (configured by its optimisations), and its seed."""
        run = RunContext(components=self.components, request=req, plan=plan, default_steps=DEFAULT_STEPS,
                         graph_key=tuple(graph_key), collective=self.parallel)
        for name in STACK_ORDER:
            if plan[name].applied:
                self.registry[name].configure(run)
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED)
        width, height = output_size(req, image)
        do_cfg = req.true_cfg_scale > 1.0
        refs = as_references(image)
        # `image` holds the list of references here; _run turns them into the pipeline's image and the extra ones
        run.call_kwargs = dict(prompt=req.prompt, image=refs or None, width=width, height=height,
                               num_inference_steps=req.steps or run.default_steps,
                               guidance_scale=req.guidance_scale, true_cfg_scale=req.true_cfg_scale,
                               negative_prompt=req.negative_prompt if do_cfg else None,
                               num_images_per_prompt=req.num_images, max_area=width * height, _auto_resize=False,
                               output_type=output_type)
        return run, seed

    def warm(self, req: InferenceRequest, image, plan: Mapping[str, Decision], seed: int,
             output_type: str = "pil", graph_key: tuple = ()) -> float | None:
        """The first call at a shape compiles / captures: run it as a 2-step generation, reported as cold start.

        Returns its milliseconds, or None when nothing needs warming or this shape is already warm."""
        if not any(plan[n].applied and self.registry[n].needs_warmup for n in STACK_ORDER):
            return None
        key = self.warm_key(req, image, plan, graph_key)
        if key in self.warm_keys:
            return None
        run, _ = self._context(req, image, plan, output_type, graph_key)
        run.call_kwargs["num_inference_steps"] = 2
        t0 = time.perf_counter()
        self._run(run, seed, None)
        cold_ms = (time.perf_counter() - t0) * 1000
        self.warmup_ms_total += cold_ms
        self.warm_keys = self.warm_keys | {key}
        if self.on_warmed is not None:
            self.on_warmed()
        return cold_ms

    def generate(self, req: InferenceRequest, image, plan: Mapping[str, Decision],
                 should_stop: Callable[[], Exception | None] | None = None,
                 output_type: str = "pil", on_step: Callable[[StepEvent], None] | None = None,
                 graph_key: tuple = ()) -> GenerationResult:
        """One request. `on_step(StepEvent)` is called after every denoising step of the timed run (not of a
        warm-up), on this thread; the previews it asks for are timed as the `preview` stage. `graph_key`: what else
        selects captured CUDA graphs (the LoRA slots' state)."""
        t_total = time.perf_counter()
        run, seed = self._context(req, image, plan, output_type, graph_key)
        warnings = [self.synthetic_warning] if self.synthetic_warning else []
        size = request_size(req, image)
        warnings += size.notes + reference_notes(image, size.width, size.height) + image_notes(image)
        warnings += [f"{self.registry[name].flag}: requested but not applied: {d.detail}"
                     for name, d in plan.items() if d.requested and not d.applied]
        timings: dict[str, float] = {}
        cold_ms = self.warm(req, image, plan, seed, output_type, graph_key)
        if cold_ms is not None:  # a reported cold-start cost, not part of the request's timing
            timings["cold_start"] = cold_ms
        t0 = time.perf_counter()
        images, timer_ms, counts, latents = self._run(run, seed, should_stop, on_step)
        wall = (time.perf_counter() - t0) * 1000
        for k in STAGES:
            timings[k] = timer_ms.get(k, 0.0)
        calls = counts.get("transformer", 0)
        do_cfg = req.true_cfg_scale > 1.0
        timings["transformer_per_step"] = timings["transformer"] / max(1, calls // (2 if do_cfg else 1))
        preview_ms = timer_ms.get("preview", 0.0)
        if counts.get("preview"):  # only when the step hook decoded previews
            timings["preview"] = preview_ms
        timings["glue"] = max(0.0, wall - sum(timings[k] for k in STAGES) - preview_ms)
        timings["total"] = wall
        timings["service_total"] = (time.perf_counter() - t_total) * 1000
        stats = run.report.get("step_cache")
        computed = stats.computed if stats is not None else calls
        skipped = stats.skipped if stats is not None else 0
        call = run.call_kwargs
        # What the applied optimisations found out while running (e.g. the step cache's threshold) joins their detail.
        decisions = {name: Decision(d.requested, d.applied, f"{d.detail}; {run.details[name]}")
                     if name in run.details else d for name, d in plan.items()}
        return GenerationResult(images=images, seed=seed, width=call["width"], height=call["height"],
                                steps=call["num_inference_steps"], steps_computed=computed, steps_skipped=skipped,
                                timings_ms={k: round(v, 3) for k, v in timings.items()}, optimizations=decisions,
                                warnings=warnings, latents=latents, size_reason=size.reason,
                                references=len(as_references(image)),
                                cache_threshold=stats.threshold if stats is not None else None)

    def _run(self, run: RunContext, seed: int, should_stop,
             on_step: Callable[[StepEvent], None] | None = None) -> tuple:
        timer = StageTimer(cuda=self.components.device_info.is_cuda)
        call = run.call_kwargs
        extra: list = []
        if call["image"]:  # inside the timed run: the request's wall time includes it
            refs = call["image"]
            tensors = [reference_image_tensor(im, w, h, self.device)
                       for im, (w, h) in zip(refs, reference_sizes(refs, call["width"], call["height"]))]
            call, extra = dict(call, image=tensors[0]), tensors[1:]
        pipe = self.components.pipe
        run.transformer = run.variant
        run.vae_encode, run.vae_decode = self.components.vae_encode["eager"], self.components.vae_decode["eager"]
        run.report.clear()
        run.details.clear()
        generator = torch.Generator(self.device).manual_seed(seed)
        final = {}
        probe = StepProbe(pipe, run, call["width"], call["height"], timer) if on_step is not None else None

        def on_step_end(pipe, i, t, kwargs):
            final["latents"] = kwargs.get("latents")
            if should_stop is not None:
                err = should_stop()
                if err is not None:
                    raise err  # ends the denoising loop now; the engine answers with the error's status
            if probe is not None:
                probe.step_done(i + 1, call["num_inference_steps"], final["latents"].shape[1], on_step)
            return {}

        with contextlib.ExitStack() as stack:
            for name in STACK_ORDER:  # in order: a later one may wrap what an earlier one chose (CUDA graphs)
                opt = self.registry[name]
                if run.plan[name].applied:
                    stack.enter_context(opt.activate(run))
                elif name in self.prepared:
                    stack.enter_context(opt.bypass(run))
            if self.parallel is not None:  # outermost: each rank's share of every transformer call
                stack.enter_context(self.parallel.wrap(run))
            stack.enter_context(_swap(pipe, "transformer", _Timed(run.transformer, timer, "transformer",
                                                                  self.transformer_call_observer,
                                                                  probe.observe if probe is not None else None)))
            stack.enter_context(_swap(pipe, "vae", _TimedVAE(pipe.vae, run.vae_encode, run.vae_decode, timer)))
            stack.enter_context(more_references(pipe, extra))  # a second, third, fourth reference image
            self._text_timer = timer
            stack.callback(setattr, self, "_text_timer", None)
            with torch.inference_mode():
                out = pipe(**call, generator=generator, callback_on_step_end=on_step_end)
        return list(out.images), timer.finish(), dict(timer.counts), final.get("latents")

    def transformer_for(self, plan: Mapping[str, Decision], req: InferenceRequest | None = None):
        """The module a request with this plan calls as its transformer (the benchmark's per-step probe calls it)."""
        run, _ = self._context(req or InferenceRequest(prompt="probe"), None, plan, "pil")
        run.transformer = run.variant
        run.vae_encode, run.vae_decode = self.components.vae_encode["eager"], self.components.vae_decode["eager"]
        with contextlib.ExitStack() as stack:
            for name in STACK_ORDER:
                if plan[name].applied:
                    stack.enter_context(self.registry[name].activate(run))
        return run.transformer
