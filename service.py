"""FluxService: load -> optimise -> generate. Runs only on the engine's worker thread (one owner of the device)."""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import bytecode_cache

bytecode_cache.enable()  # before the heavy imports below (so they are not at the top): see bytecode_cache.py
import cublaslt_workspace  # noqa: E402

cublaslt_workspace.configure()  # before torch's first GEMM reads it: see cublaslt_workspace.py

import numpy as np
import torch
from PIL import Image

import model_sources
from optimizations.base import DeviceInfo, RunContext
from optimizations.compile_cache import CompileCache, cache_key
from optimizations.cuda_graphs import (CudaGraphCall, CudaGraphEncoder, CudaGraphTransformer, vae_decode_from_pixels,
                                       vae_encode_from_moments)
from optimizations.registry import STACK_ORDER, build_registry, resolve_names
from patches import t5_contiguous_position_bias
from schemas import DEFAULT_DPM_STEPS, DEFAULT_STEPS, MAX_SEED, InferenceRequest
from utils import StageTimer, default_size_for, module_bytes

log = logging.getLogger("flux.service")


NEW_SHAPE_POLICIES = ("compile", "eager")


@dataclass
class ServiceConfig:
    model: str = model_sources.TINY
    device: str | None = None  # None: cuda if available, else cpu
    optimizations: str = "auto"  # all | none | auto | comma list (see optimizations/registry.py)
    compile_mode: str = "default"
    compile_vae: bool = True
    compile_scope: str = "regional"  # regional (per block) | full (one graph)
    inductor_flags: str = "light"  # inductor flag preset: none | light | seed (adds coordinate-descent tuning)
    cache_dir: Path | None = None
    # Request shapes to compile / capture at start-up: (width, height) for text-to-image, (width, height, True) for an
    # edit (its reference image doubles the transformer's sequence, a different compiled shape).
    warmup_sizes: list[tuple] = field(default_factory=list)
    # A request at a shape no warm-up compiled: "compile" compiles it on that request's time (tens of seconds for the
    # full model, minutes for fp8 without the cache, with the worker and every queued request waiting); "eager" runs
    # it uncompiled and says so in the response.
    new_shapes: str = "compile"

    def __post_init__(self):
        if self.new_shapes not in NEW_SHAPE_POLICIES:
            raise ValueError(f"new_shapes must be one of {NEW_SHAPE_POLICIES}, not {self.new_shapes!r}")
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)


@dataclass
class Decision:
    requested: bool
    applied: bool
    detail: str


class StrictError(ValueError):
    """`strict: true` and a requested optimisation would not run. Maps to 422."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems  # (request field, reason)
        super().__init__("; ".join(f"{f}: {r}" for f, r in problems))


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


def _inductor_cache_dir_is_default() -> bool:
    """True unless the operator chose TORCHINDUCTOR_CACHE_DIR (importing diffusers already sets torch's default)."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None:
        return True
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # older torch: keep whatever is there
        return False
    return os.path.abspath(current) == os.path.abspath(default_cache_dir())


class _Timed:
    """Stand-in for the transformer that times each call; everything else is the wrapped object's."""

    def __init__(self, inner, timer: StageTimer, stage: str, observer: Callable | None = None):
        self._inner, self._timer, self._stage, self._observer = inner, timer, stage, observer

    def __call__(self, *args, **kwargs):
        if self._observer is not None:
            self._observer(kwargs)  # the benchmark records real step inputs for its per-step fidelity check
        self._timer.start(self._stage)
        try:
            return self._inner(*args, **kwargs)
        finally:
            self._timer.stop(self._stage)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _TimedVAE:
    """Stand-in for the VAE: times encode and decode, and routes each to the eager or compiled version."""

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
    [0, 1], here made on `device`. Given a PIL image, diffusers converts it with numpy on the host (uint8 -> float32
    / 255), and on the H100 host that took 8-28 ms per 512x512 request while the GPU waited
    (tools/profile_request.py). Only the uint8 pixels cross to the GPU here; the division is the same float32
    operation, so the values are identical, and the pipeline normalises the tensor to [-1, 1] as before."""
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


class FluxService:
    def __init__(self, config: ServiceConfig | None = None):
        self.config = config or ServiceConfig()
        device = self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = device
        self.device_info = DeviceInfo.detect(device)
        self.cache_root = self.config.cache_dir or model_sources.default_cache_dir()
        self.registry = build_registry(self.config.compile_mode, self.config.compile_vae, self.config.compile_scope,
                                       self.config.inductor_flags)
        self.state = "loading"
        self.error: str | None = None
        self.model: model_sources.LoadedModel | None = None
        self.pipe = None
        self.prepared: dict[str, str] = {}  # name -> detail
        self.prepare_seconds: dict[str, float] = {}
        self.transformer_variants: dict[str, Any] = {}  # precision ("bf16", "fp8") -> transformer module
        self.transformer_variant_bytes: dict[str, int] = {}  # precision -> bytes of weights (set by prepare)
        self.vae_encode_eager = self.vae_decode_eager = None
        self.vae_encode_compiled = self.vae_decode_compiled = None
        self.compile_cache: CompileCache | None = None
        self.cuda_graph_runners: dict = {}
        self.text_encoder_graphs: dict = {}  # pipeline attribute ("text_encoder", "text_encoder_2") -> runner
        self.vae_graphs: dict = {}  # "eager" / "compiled" -> (encode runner, decode runner)
        # (shape, compiled, graphs, step cache, true CFG) already compiled / captured; shape: see _compile_shape
        self._warm_keys: set = set()
        self._text_timer: StageTimer | None = None
        self.transformer_call_observer: Callable | None = None  # benchmark only: sees each transformer call's kwargs
        self.warmup_ms_total = 0.0
        self.warmups: list[dict] = []  # start-up warm-ups: shape, precision, milliseconds (in /health)
        self.load_fixes: dict = {}  # patches/ applied to the loaded components, with counts (in /health)

    # ------------------------------------------------------------------------------------------------------
    # 1. load
    # ------------------------------------------------------------------------------------------------------
    def load(self) -> None:
        try:
            self.model = model_sources.load_model(self.config.model, self.device, self.cache_root)
            self.pipe = self.model.pipe
            self.transformer_variants["bf16"] = self.pipe.transformer
            self.vae_encode_eager, self.vae_decode_eager = self.pipe.vae.encode, self.pipe.vae.decode
            # Older transformers hand T5's bias to SDPA as a strided view: the GPU falls back to fp32 math attention
            self.load_fixes["t5_contiguous_position_bias"] = t5_contiguous_position_bias.apply(self.pipe.text_encoder_2)
            for enc in (self.pipe.text_encoder, self.pipe.text_encoder_2):
                enc.register_forward_pre_hook(lambda *_: self._text_timer and self._text_timer.start("text_encode"))
                enc.register_forward_hook(lambda *_: self._text_timer and self._text_timer.stop("text_encode"))
            names = resolve_names(self.config.optimizations, self.registry, self.device_info)
            self.prepare(names)
            for size in self.config.warmup_sizes:
                self.warm_up(*size)
            self.state = "ready"
        except Exception as exc:
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            raise

    # ------------------------------------------------------------------------------------------------------
    # 2. optimise (additive: the benchmark prepares stage by stage on one loaded model)
    # ------------------------------------------------------------------------------------------------------
    def prepare(self, names: list[str]) -> None:
        names = [n for n in names if n not in self.prepared]
        for name in names:
            reason = self.registry[name].available(self.device_info)
            if reason:
                raise ValueError(f"cannot prepare {name!r} on {self.device_info.name}: {reason}")
        if "compile" in names:
            self._open_compile_cache(sorted(set(self.prepared) | set(names)))
        if names:  # compiled code and captured graphs may now be stale: warm up and capture again
            self._warm_keys.clear()
            self.cuda_graph_runners.clear()
            self.text_encoder_graphs.clear()
            self.vae_graphs.clear()
        for name in names:
            t0 = time.perf_counter()
            self.prepared[name] = self.registry[name].prepare(self)
            self.prepare_seconds[name] = time.perf_counter() - t0
            log.info("prepared %s in %.1f s: %s", name, self.prepare_seconds[name], self.prepared[name])
        if names and "compile" in self.prepared:  # saved compiled regions follow blocks changed since compile
            self.registry["compile"].refresh(self)
        # Weights each variant holds (fp8: fp8 data + scales + the linears kept in bf16), measured from its tensors
        # once here, where variants appear and QKV fusion frees weights, not on every /health poll.
        self.transformer_variant_bytes = {name: module_bytes(m) for name, m in self.transformer_variants.items()}

    def _open_compile_cache(self, names: list[str]) -> None:
        # Inductor's own on-disk cache (compiled kernels, C++ objects) next to the model cache, unless the operator
        # chose one: a restart on the same machine or volume then skips kernel compilation entirely. The mega-cache
        # file below is the portable part (it carries GPU kernels, but on CPU the C++ must be rebuilt from it).
        if _inductor_cache_dir_is_default():
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.cache_root / "inductor")
        cfg = dict(self.pipe.transformer.config)
        key = cache_key(self.device_info.name, {k: v for k, v in cfg.items() if not k.startswith("_")}
                        | {"source": self.model.source}, names,
                        f"{self.config.compile_mode}/{self.config.compile_scope}/{self.config.inductor_flags}")
        self.compile_cache = CompileCache(self.cache_root / "compile", key)
        self.compile_cache.load()

    # ------------------------------------------------------------------------------------------------------
    # 3. plan: what a request gets, decided before it is queued (strict errors are 422s, not worker failures)
    # ------------------------------------------------------------------------------------------------------
    def plan(self, req: InferenceRequest, image: Image.Image | None = None,
             new_shape_policy: bool = True) -> dict[str, Decision]:
        """What the request gets. `image` (the decoded reference image, if any) sets its shape, which the
        --new-shapes eager policy needs; warm-ups pass new_shape_policy=False (they are what compiles a shape)."""
        flags = req.flags()
        field_of = {o.name: o.flag for o in self.registry.values()}
        plan: dict[str, Decision] = {}
        problems: list[tuple[str, str]] = []
        for name in STACK_ORDER:
            opt, flag = self.registry[name], flags[name]
            prepared = name in self.prepared
            default_on = prepared and not opt.lossy
            want = default_on if flag is None else flag
            suffix = " (server default)" if flag is None and want else ""
            if not prepared:
                why = opt.available(self.device_info) or "not prepared at start-up (see --optimizations)"
                plan[name] = Decision(want, False, why)
            elif not opt.toggle:
                note = "; requested off, but it is load-time and stays on once prepared" if flag is False else ""
                if flag is False:
                    problems.append((field_of[name], "load-time optimisation cannot be turned off per request"))
                plan[name] = Decision(want, True, self.prepared[name] + note + suffix)
            else:
                plan[name] = Decision(want, want, (self.prepared[name] + suffix) if want else "not requested")
        # Combinations that cannot run together: the step cache decides per step on the host, so it cannot live
        # inside one captured graph (CUDA graphs) or one whole-model compiled graph.
        if plan["first_block_cache"].applied:
            if plan["cuda_graphs"].applied:
                plan["cuda_graphs"] = Decision(plan["cuda_graphs"].requested, False,
                                               "not combinable with the first-block cache (data-dependent skipping)")
            if plan["compile"].applied and self.registry["compile"].scope == "full":
                plan["first_block_cache"] = Decision(True, False, "not combinable with full-graph compile "
                                                     "(start the server with --compile-scope regional)")
        if new_shape_policy and plan["compile"].applied and self.config.new_shapes == "eager":
            shape = self._compile_shape(req, image, plan)
            if not any(key[0] == shape and key[1] for key in self._warm_keys):  # no compiled warm run at it
                w, h = shape[1], shape[2]
                plan["compile"] = Decision(plan["compile"].requested, False,
                                           f"{w}x{h} {'edit' if image is not None else 'text-to-image'} "
                                           f"({shape[0]}) was not warmed up: runs uncompiled (--new-shapes eager)")
        for name, d in plan.items():
            if d.requested and not d.applied and flags[name] is True:
                problems.append((field_of[name], d.detail))
        if req.strict and problems:
            raise StrictError(problems)
        return plan

    # ------------------------------------------------------------------------------------------------------
    # 4. generate
    # ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _output_size(req: InferenceRequest, image: Image.Image | None) -> tuple[int, int]:
        default_w, default_h = default_size_for(image)
        return req.width or default_w, req.height or default_h

    @staticmethod
    def _precision(plan: dict[str, Decision]) -> str:
        """The transformer variant a plan runs: the key into transformer_variants."""
        return "fp8" if plan["low_precision"].applied else "bf16"

    def _compile_shape(self, req: InferenceRequest, image: Image.Image | None, plan: dict[str, Decision]) -> tuple:
        """What a compiled graph is specialised on: precision, output size, edit or not, images per prompt."""
        return (self._precision(plan), *self._output_size(req, image), image is not None, req.num_images)

    def _transformer_for(self, plan: dict[str, Decision]):
        precision = self._precision(plan)
        module = self.transformer_variants[precision]
        if plan["cuda_graphs"].applied:
            if precision not in self.cuda_graph_runners:
                self.cuda_graph_runners[precision] = CudaGraphTransformer(module, self.cuda_graph_pool)
            module = self.cuda_graph_runners[precision]
        return precision, module

    def _vae_replayed(self, encode: Callable, decode: Callable, compiled: bool) -> tuple[Callable, Callable]:
        """The VAE's encode and decode replayed from graphs, captured per shape (apart for eager and compiled code)."""
        key = "compiled" if compiled else "eager"
        runners = self.vae_graphs.get(key)
        if runners is None:
            runners = self.vae_graphs[key] = (
                CudaGraphCall(lambda x: encode(x).latent_dist.parameters, self.cuda_graph_pool),
                CudaGraphCall(lambda z: decode(z, return_dict=False)[0], self.cuda_graph_pool))
        return vae_encode_from_moments(runners[0]), vae_decode_from_pixels(runners[1])

    def _text_encoder_graph(self, attr: str):
        runner = self.text_encoder_graphs.get(attr)
        if runner is None:
            runner = self.text_encoder_graphs[attr] = CudaGraphEncoder(getattr(self.pipe, attr), self.cuda_graph_pool)
        return runner

    def _request_call(self, req: InferenceRequest, image: Image.Image | None, plan: dict[str, Decision],
                      output_type: str) -> tuple[dict, int, bool]:
        """The pipeline call a request makes, its seed, and whether it runs true CFG."""
        dpm = plan["dpm_solver"].applied
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED)
        width, height = self._output_size(req, image)
        steps = req.steps or (DEFAULT_DPM_STEPS if dpm else DEFAULT_STEPS)
        do_cfg = req.true_cfg_scale > 1.0
        call = dict(prompt=req.prompt, image=image, width=width, height=height, num_inference_steps=steps,
                    guidance_scale=req.guidance_scale, true_cfg_scale=req.true_cfg_scale,
                    negative_prompt=req.negative_prompt if do_cfg else None, num_images_per_prompt=req.num_images,
                    max_area=width * height, _auto_resize=False, output_type=output_type)
        return call, seed, do_cfg

    def _warm(self, req, plan, precision, transformer, call, seed, do_cfg) -> float | None:
        """The first call at a shape compiles / captures: run it as a 2-step generation, reported as cold start.

        Returns its milliseconds, or None when this shape and optimisation set is already warm.
        """
        if not (plan["compile"].applied or plan["cuda_graphs"].applied):
            return None
        key = (self._compile_shape(req, call["image"], plan), plan["compile"].applied, plan["cuda_graphs"].applied,
               plan["first_block_cache"].applied, do_cfg)
        if key in self._warm_keys:
            return None
        t0 = time.perf_counter()
        self._run(req, plan, precision, transformer, dict(call, num_inference_steps=2), seed, None)
        cold_ms = (time.perf_counter() - t0) * 1000
        self.warmup_ms_total += cold_ms
        self._warm_keys.add(key)
        self._save_compile_cache()
        return cold_ms

    def generate(self, req: InferenceRequest, image: Image.Image | None = None,
                 should_stop: Callable[[], Exception | None] | None = None, output_type: str = "pil",
                 plan: dict[str, Decision] | None = None) -> GenerationResult:
        if self.state != "ready":
            raise RuntimeError(f"service is {self.state}")
        t_total = time.perf_counter()
        plan = plan or self.plan(req, image)
        call, seed, do_cfg = self._request_call(req, image, plan, output_type)
        warnings: list[str] = []
        if self.model.synthetic:
            warnings.append(f"model {self.model.source!r} has random weights: the images carry no meaning")

        precision, transformer = self._transformer_for(plan)
        timings: dict[str, float] = {}
        cold_ms = self._warm(req, plan, precision, transformer, call, seed, do_cfg)
        if cold_ms is not None:  # a reported cold-start cost, not part of the request's timing
            timings["cold_start"] = cold_ms

        t0 = time.perf_counter()
        images, timer_ms, counts, stats, latents = self._run(req, plan, precision, transformer, call, seed, should_stop)
        wall = (time.perf_counter() - t0) * 1000
        stage_keys = ("text_encode", "image_encode", "transformer", "vae_decode")
        for k in stage_keys:
            timings[k] = timer_ms.get(k, 0.0)
        calls = counts.get("transformer", 0)
        timings["transformer_per_step"] = timings["transformer"] / max(1, calls // (2 if do_cfg else 1))
        timings["glue"] = max(0.0, wall - sum(timings[k] for k in stage_keys))
        timings["total"] = wall
        timings["service_total"] = (time.perf_counter() - t_total) * 1000
        computed = stats.computed if stats is not None else calls
        skipped = stats.skipped if stats is not None else 0
        return GenerationResult(images=images, seed=seed, width=call["width"], height=call["height"],
                                steps=call["num_inference_steps"], steps_computed=computed, steps_skipped=skipped,
                                timings_ms={k: round(v, 3) for k, v in timings.items()}, optimizations=plan,
                                warnings=warnings, latents=latents)

    def _run(self, req, plan, precision, transformer, call, seed, should_stop):
        timer = StageTimer(cuda=self.device_info.is_cuda)
        if call["image"] is not None:  # inside the timed run: the request's wall time includes it
            call = dict(call, image=reference_image_tensor(call["image"], call["width"], call["height"], self.device))
        run = RunContext(service=self, request=req, call_kwargs=call, precision=precision)
        compiled_vae = plan["compile"].applied and self.vae_decode_compiled is not None
        encode = self.vae_encode_compiled if compiled_vae else self.vae_encode_eager
        decode = self.vae_decode_compiled if compiled_vae else self.vae_decode_eager
        if plan["cuda_graphs"].applied:
            encode, decode = self._vae_replayed(encode, decode, compiled_vae)
        generator = torch.Generator(self.device).manual_seed(seed)

        final = {}

        def on_step_end(pipe, i, t, kwargs):
            final["latents"] = kwargs.get("latents")
            if should_stop is not None:
                err = should_stop()
                if err is not None:
                    raise err  # ends the denoising loop now; the engine answers with the error's status
            return {}

        stats = None
        with contextlib.ExitStack() as stack:
            for name in STACK_ORDER:
                if plan[name].applied:
                    ctx, _detail = self.registry[name].activate(run)
                    value = stack.enter_context(ctx)
                    if name == "first_block_cache":
                        stats = value
            stack.enter_context(_swap(self.pipe, "transformer", _Timed(transformer, timer, "transformer",
                                                                       self.transformer_call_observer)))
            stack.enter_context(_swap(self.pipe, "vae", _TimedVAE(self.pipe.vae, encode, decode, timer)))
            if plan["cuda_graphs"].applied:  # each encoder's forward replays its graph (the timing hooks stay)
                for attr in ("text_encoder", "text_encoder_2"):
                    stack.enter_context(self._text_encoder_graph(attr).installed())
            self._text_timer = timer
            stack.callback(setattr, self, "_text_timer", None)
            if "compile" in self.prepared and not plan["compile"].applied:  # compiled in place: run the original code
                stack.enter_context(torch.compiler.set_stance("force_eager"))
            with torch.inference_mode():
                out = self.pipe(**call, generator=generator, callback_on_step_end=on_step_end)
        images = list(out.images)
        return images, timer.finish(), dict(timer.counts), stats, final.get("latents")

    def warm_up(self, width: int, height: int, edit: bool = False) -> float:
        """Compile / capture a request shape ahead of traffic (start-up cost, reported in /health).

        Every prepared transformer variant is warmed (exact bf16 and, with low_precision prepared, fp8: a request
        asking for it would otherwise compile it on its own time), with the server's default flags otherwise.
        Only the cold runs: a generation after them would add seconds to start-up and warm nothing more. Returns
        their milliseconds (0.0 when nothing is compiled or captured, or the shape was already warm).
        """
        img = Image.new("RGB", (width, height), (128, 128, 128)) if edit else None
        total = 0.0
        for fp8 in ([False, True] if "low_precision" in self.prepared else [False]):
            req = InferenceRequest(prompt="warm-up", width=width, height=height, steps=2, seed=0,
                                   use_mxfp4=True if fp8 else None)
            plan = self.plan(req, img, new_shape_policy=False)
            call, seed, do_cfg = self._request_call(req, img, plan, "pil")
            precision, transformer = self._transformer_for(plan)
            ms = self._warm(req, plan, precision, transformer, call, seed, do_cfg)
            if ms is not None:
                self.warmups.append({"width": width, "height": height, "edit": edit, "precision": precision,
                                     "ms": round(ms, 1)})
                total += ms
        return total

    def _save_compile_cache(self) -> None:
        if self.compile_cache is not None:
            try:
                self.compile_cache.save()
            except Exception as exc:  # saving is an optimisation; never fail a request for it
                log.warning("could not save compile cache: %s", exc)

    # ------------------------------------------------------------------------------------------------------
    # health
    # ------------------------------------------------------------------------------------------------------
    def health(self) -> dict:
        info: dict[str, Any] = {"status": self.state, "device": self.device, "device_name": self.device_info.name}
        if self.error:
            info["error"] = self.error
        if self.model is not None:
            info["model"] = {"source": self.model.source, "synthetic": self.model.synthetic,
                             "description": self.model.description, "load_seconds": round(self.model.load_seconds, 2)}
            info["dtype"] = str(self.pipe.transformer.dtype).replace("torch.", "")
        info["optimizations"] = {
            name: {"prepared": name in self.prepared, "load_time": self.registry[name].load_time,
                   "detail": self.prepared.get(name) or self.registry[name].available(self.device_info)
                   or "not prepared at start-up",
                   "prepare_seconds": round(self.prepare_seconds.get(name, 0.0), 2)}
            for name in STACK_ORDER}
        info["transformer_variants"] = sorted(self.transformer_variants)
        info["transformer_variant_bytes"] = self.transformer_variant_bytes
        if self.compile_cache is not None:
            info["compile_cache"] = {"key": self.compile_cache.key, "loaded": self.compile_cache.loaded,
                                     "detail": self.compile_cache.load_detail,
                                     "saved_bytes": self.compile_cache.saved_bytes,
                                     "load_seconds": round(self.compile_cache.load_seconds, 3),
                                     "save_seconds": round(self.compile_cache.save_seconds, 3),
                                     "saves": self.compile_cache.saves,
                                     "saves_skipped": self.compile_cache.saves_skipped,
                                     "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                                     "aot_regions": self.registry["compile"].aot_stats.as_dict(),
                                     **self.compile_cache.counters()}
        info["bytecode_cache"] = bytecode_cache.status
        info["cublaslt_workspace"] = cublaslt_workspace.status
        info["warmup_ms_total"] = round(self.warmup_ms_total, 1)
        info["warmups"] = self.warmups
        info["load_fixes"] = self.load_fixes
        if self.device_info.is_cuda:
            info["gpu_memory_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        return info
