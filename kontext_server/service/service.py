"""FluxService: load -> optimise -> plan -> generate, for one device.

What: the façade the HTTP layer, the CLI and the benchmark use. It owns the loaded components (components.py), the
registry of optimisations, the planner's inputs (planner.py) and the runner (runner.py).
Contract: `load`, `prepare`, `generate` and `warm_up` run on the engine's worker thread only (one owner of the
device); `plan` and `health` are safe anywhere (they read state that is replaced, never mutated, while the worker
runs).
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable

from kontext_server.startup import prepare_process

prepare_process()  # before torch is imported below: see kontext_server/startup

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from kontext_server import settings  # noqa: E402
from kontext_server.request import DEFAULT_DPM_STEPS, InferenceRequest  # noqa: E402
from kontext_server.service import compile_lock  # noqa: E402
from kontext_server.service import components as comp  # noqa: E402
from kontext_server.service.config import ServiceConfig  # noqa: E402
from kontext_server.models import ModelLoadError  # noqa: E402
from kontext_server.service import memory_sizes, offload  # noqa: E402
from kontext_server.service.health import health_report  # noqa: E402
from kontext_server.service.memory_tiers import (LABELS, SETTING, T5, BudgetTooSmall, MemoryTier,  # noqa: E402
                                                 parse_budget, plan_tier, variant_component)
from kontext_server.service.planner import plan as make_plan  # noqa: E402
from kontext_server.lora.library import UnknownAdapter, selectable  # noqa: E402
from kontext_server.service.runner import (GenerationResult, Runner, compile_shape, output_size,  # noqa: E402
                                          shape_is_compiled)
from kontext_server.service.steps import StepEvent  # noqa: E402
from optimizations.base import EXACT, Decision, DeviceInfo  # noqa: E402
from optimizations.registry import build_registry, resolve_names  # noqa: E402
from utils import module_bytes  # noqa: E402

log = logging.getLogger("flux.service")


def plan_request(req: InferenceRequest, image: Image.Image | None, registry, prepared: dict[str, str],
                 device_info: DeviceInfo, warm_keys: Callable[[], frozenset] | None = None,
                 offloaded: dict[str, str] | None = None) -> dict[str, Decision]:
    """The planner's call for one request: `FluxService.plan` here, and the Ray Serve ingress's service proxy with
    what its replicas report (serving/ray/remote_service.py), so both plan alike. `warm_keys` (the runner's compiled
    shapes, read when needed) is given only under --new-shapes eager: a shape it lacks then runs uncompiled.
    `offloaded`: what a memory budget offloads (memory_tiers.MemoryTier.offloaded), None without one."""
    unwarmed = None
    if warm_keys is not None:
        def unwarmed(decisions) -> str | None:
            shape = compile_shape(registry, req, image, decisions)
            if shape_is_compiled(registry, warm_keys(), shape):
                return None
            w, h, refs = shape[1], shape[2], len(shape[3])
            kind = "text-to-image" if not refs else "edit" if refs == 1 else f"edit with {refs} reference images"
            return f"{w}x{h} {kind} ({shape[0]})"

    return make_plan(req.flags(), registry, prepared, device_info, strict=req.strict, unwarmed_shape=unwarmed,
                     offloaded=offloaded, precision_of=lambda decisions: Runner.precision(decisions, registry))


class FluxService:
    def __init__(self, config: ServiceConfig | None = None):
        self.config = config or ServiceConfig()
        self.device = self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device_info = DeviceInfo.detect(self.device, self.config.context_parallel)
        self.cache_root = self.config.cache_dir or settings.default_cache_dir()
        self.registry = build_registry(self.config.compile_mode, self.config.compile_vae, self.config.compile_scope,
                                       self.config.inductor_flags, dpm_default_steps=DEFAULT_DPM_STEPS)
        self.state = "loading"
        self.error: str | None = None
        self.loaded: comp.Loaded | None = None
        self.runner: Runner | None = None
        self.prepared: dict[str, str] = {}  # name -> detail; replaced on each prepare, never mutated
        self.prepare_seconds: dict[str, float] = {}
        self.transformer_variant_bytes: dict[str, int] = {}
        self.compile_cache = None
        self.compile_lock: dict | None = None  # this start's role on the shared cache directory (compile_lock.py)
        self.warmups: list[dict] = []  # start-up warm-ups: shape, precision, milliseconds (in /health)
        self.parallel = None  # context parallelism: kontext_server/parallel sets its SequenceSplit (the Runner's)
        self.lora = None  # kontext_server.lora.manager.LoraManager with --lora-dir
        # --memory-budget (memory_tiers.py): the budget, the tier planned for it, what applying it did, or why no
        # tier applies (auto on a CPU)
        self.budget = parse_budget(self.config.memory_budget)
        self.memory_tier: MemoryTier | None = None
        self.memory_tier_applied: dict = {}
        self.memory_tier_note: str | None = None

    # ---- what was loaded ------------------------------------------------------------------------------------------
    @property
    def model(self):
        return self.loaded.model if self.loaded else None

    @property
    def pipe(self):
        return self.loaded.components.pipe if self.loaded else None

    @property
    def components(self):
        return self.loaded.components if self.loaded else None

    @property
    def transformer_variants(self) -> dict[str, Any]:
        return self.loaded.components.variants if self.loaded else {}

    @property
    def load_fixes(self) -> dict:
        return self.loaded.load_fixes if self.loaded else {}

    @property
    def warmup_ms_total(self) -> float:
        return self.runner.warmup_ms_total if self.runner else 0.0

    @property
    def transformer_call_observer(self) -> Callable | None:
        return self.runner.transformer_call_observer

    @transformer_call_observer.setter
    def transformer_call_observer(self, fn: Callable | None) -> None:
        self.runner.transformer_call_observer = fn

    # ---- 1. load ----------------------------------------------------------------------------------------------------
    def load(self) -> None:
        try:
            tiered = self.budget is not None and not (self.budget.auto and not self.device_info.is_cuda)
            if self.budget is not None and not tiered:
                self.memory_tier_note = "auto on a CPU: no device memory to budget; nothing is offloaded"
            self.loaded = comp.load_components(self.config.model, self.device, self.device_info, self.cache_root,
                                               self.config.transformer, on_host=tiered)
            components = self.loaded.components
            components.on_new_variant.append(self._adopt_variant)
            names = resolve_names(self.config.optimizations, self.registry, self.device_info)
            if tiered:  # before anything is prepared: the optimisations prepare the modules where they will run
                self._plan_memory_tier(names)
            if self.config.lora_dir is not None:  # before any optimisation: adapters name the modules as loaded
                from kontext_server.lora.manager import LoraManager

                self.lora = LoraManager.create(self.config, components.variants[EXACT], self.device)
                components.saved_regions_blocked = self.lora.saved_regions_blocked()
            warning = None
            if self.loaded.model.synthetic:
                warning = f"model {self.loaded.model.source!r} has random weights: the images carry no meaning"
            self.runner = Runner(components, self.registry, self.prepared, self.device, warning, self.parallel)
            self.runner.on_warmed = self._save_compile_cache
            # Processes sharing the cache directory (replicas on one host) compile once: see compile_lock.py
            lock = compile_lock.first_compiler(self.cache_root / "compile", self.config.compile_lock_wait) \
                if "compile" in names else contextlib.nullcontext(None)
            with lock as self.compile_lock:
                self.prepare(names)
                if self.memory_tier is not None:
                    self.memory_tier_applied = offload.apply(components, self.memory_tier, self.device,
                                                             "modulation_table" in self.prepared)
                if self.lora is not None:
                    self._install_lora()
                for size in self.config.warmup_sizes:
                    self.warm_up(*size)
            self.state = "ready"
        except Exception as exc:
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            raise

    def _plan_memory_tier(self, names: list[str]) -> None:
        """Plan the tier for the budget from the loaded model's sizes, and place what stays resident before the
        optimisations are prepared (offload.place_for_prepare). ModelLoadError: a budget too small, or LoRA slots
        with a transformer offloaded."""
        components = self.loaded.components
        budget = self.budget.bytes if not self.budget.auto else memory_sizes.device_budget(self.device)
        spec = self.budget.spec if not self.budget.auto else f"auto ({budget / 2**30:.2f} GiB free)"
        sizes = memory_sizes.measure(components.pipe, fp8="low_precision" in names,
                                     warmup_sizes=self.config.warmup_sizes)
        try:
            tier = plan_tier(budget, sizes, fp8="low_precision" in names,
                             modulation_table="modulation_table" in names, spec=spec,
                             streams=self.device_info.is_cuda)
        except BudgetTooSmall as exc:
            raise ModelLoadError(str(exc)) from None
        offloaded = [n for n in tier.offloaded() if n.startswith("transformer")]
        if self.config.lora_dir is not None and offloaded:
            raise ModelLoadError(f"{SETTING} {spec} offloads the {', '.join(offloaded)}, and LoRA slots (--lora-dir) "
                                 "need every transformer variant on the device: raise the budget or drop --lora-dir")
        offload.place_for_prepare(components, tier, self.device)
        self.memory_tier = tier

    # ---- 2. optimise (additive: the benchmark prepares stage by stage on one loaded model) -----------------------
    def prepare(self, names: list[str]) -> None:
        names = [n for n in names if n not in self.prepared]
        if names and self.memory_tier_applied:
            raise RuntimeError(f"{SETTING}: nothing can be prepared after the memory tier placed the model (the "
                               "offload hooks hold the modules as they were)")
        if names and self.lora is not None and self.lora.installed:
            raise RuntimeError("LoRA slots wrap the modules the start-up optimisations produced: nothing can be "
                               "prepared after them")
        for name in names:
            reason = self.registry[name].available(self.device_info)
            if reason:
                raise ValueError(f"cannot prepare {name!r} on {self.device_info.name}: {reason}")
        components = self.loaded.components
        if "compile" in names:
            settings_key = f"{self.config.compile_mode}/{self.config.compile_scope}/{self.config.inductor_flags}"
            if self.config.context_parallel > 1:  # the compiled blocks hold the split attention's collectives
                settings_key += f"/cp{self.config.context_parallel}"
            self.compile_cache = components.compile_cache = comp.open_compile_cache(
                self.loaded, self.cache_root, sorted(set(self.prepared) | set(names)), settings_key)
        for name in names:
            t0 = time.perf_counter()
            detail = self.registry[name].prepare(components)
            self.prepare_seconds[name] = time.perf_counter() - t0
            self._set_prepared({**self.prepared, name: detail})
            log.info("prepared %s in %.1f s: %s", name, self.prepare_seconds[name], detail)
        if names:  # compiled code and captured graphs may now be stale: warm up and capture again
            self.runner.warm_keys = frozenset()
            for name in self.prepared:
                self.registry[name].refresh(components)
        # Weights each variant holds (fp8: fp8 data + scales + the linears kept in bf16), measured from its tensors
        # once here, where variants appear and QKV fusion frees weights, not on every /health poll.
        self.transformer_variant_bytes = {name: module_bytes(m) for name, m in components.variants.items()}

    def _install_lora(self) -> None:
        """Slots and their wrappers on the final modules of every variant; then what compiled code and captured
        graphs hold is stale (nothing ran yet at start-up), and the preloads."""
        components = self.loaded.components
        self.lora.install(components.variants)
        for name in self.prepared:
            self.registry[name].refresh(components)
        self.lora.preload(self.config.lora_preload)

    def _set_prepared(self, prepared: dict[str, str]) -> None:
        self.prepared = prepared
        if self.runner is not None:
            self.runner.prepared = prepared

    def _adopt_variant(self, precision: str, module) -> None:
        for name in self.prepared:
            self.registry[name].adopt(self.loaded.components, precision, module)

    # ---- 3. plan: what a request gets, decided before it is queued --------------------------------------------------
    def plan(self, req: InferenceRequest, image: Image.Image | None = None,
             new_shape_policy: bool = True) -> dict[str, Decision]:
        """What the request gets (StrictError: a `strict` request cannot get what it asked for). `image` (the
        decoded reference image, if any) sets its shape, which the --new-shapes eager policy needs; warm-ups pass
        new_shape_policy=False (they are what compiles a shape)."""
        eager = new_shape_policy and self.config.new_shapes == "eager" and self.runner is not None
        return plan_request(req, image, self.registry, self.prepared, self.device_info,
                            warm_keys=(lambda: self.runner.warm_keys) if eager else None,
                            offloaded=self.offloaded())

    def offloaded(self) -> dict[str, str] | None:
        """Component -> how the memory tier offloads it; None without a tier."""
        return self.memory_tier.offloaded() if self.memory_tier is not None else None

    # ---- 4. generate ------------------------------------------------------------------------------------------------
    def generate(self, req: InferenceRequest, image: Image.Image | None = None,
                 should_stop: Callable[[], Exception | None] | None = None, output_type: str = "pil",
                 plan: dict[str, Decision] | None = None,
                 on_step: Callable[[StepEvent], None] | None = None) -> GenerationResult:
        """One request on the worker thread. `on_step`: called after every denoising step (service/steps.py)."""
        if self.state != "ready":
            raise RuntimeError(f"service is {self.state}")
        plan = plan or self.plan(req, image)
        try:
            result = self._generate(req, image, plan, should_stop, output_type, on_step)
        except BaseException:
            if self.memory_tier is not None and self.memory_tier.offloaded():
                offload.reset(self.loaded.components)  # e.g. out of memory mid-forward: the groups back on the host
            raise
        if self.memory_tier is not None:
            self._report_memory_tier(result, plan)
        return result

    def _generate(self, req, image, plan, should_stop, output_type, on_step) -> GenerationResult:
        if self.lora is None:
            self.check_loras(req)
            return self.runner.generate(req, image, plan, should_stop, output_type, on_step)
        with self.lora.applied(req.loras, Runner.precision(plan, self.registry)) as applied:
            result = self.runner.generate(req, image, plan, should_stop, output_type, on_step,
                                          graph_key=applied.graph_key)
        result.loras = applied.loras
        if applied.load_ms is not None:  # reported like a cold start: never part of `total`
            result.timings_ms["lora_load"] = round(applied.load_ms, 3)
        if applied.switch_ms is not None:
            result.timings_ms["lora_switch"] = round(applied.switch_ms, 3)
        return result

    def _report_memory_tier(self, result: GenerationResult, plan: dict[str, Decision]) -> None:
        """What of the tier this request met: its transformer variant resident or offloaded, T5, the VAE's tiles."""
        tier = self.memory_tier
        component = variant_component(Runner.precision(plan, self.registry))
        offloaded = tier.offloaded()
        ran = [name for name in (component, T5) if name in offloaded]
        tiled = tier.vae_tile is not None and max(result.width, result.height) > tier.vae_tile
        result.memory_tier = {"budget": tier.spec, "transformer": component,
                              "transformer_offloaded": component in offloaded,
                              "ran_offloaded": {name: offloaded[name] for name in ran},
                              "vae_tiled": tiled, "vae_tile_px": tier.vae_tile if tiled else None}
        if component in offloaded:
            result.warnings.append(f"ran offloaded: the {LABELS[component]} was streamed in from host memory block by "
                                   f"block (--memory-budget {tier.spec}); slower than resident")

    def lora_names(self) -> list[str]:
        """The adapters a request may select by name alone (GET /v1/models lists them): lora.library.selectable."""
        return selectable(self.lora.library_report()) if self.lora is not None else []

    def check_loras(self, req: InferenceRequest) -> None:
        """The cheap check of a request's adapters before it is queued: LoraError (its `index` set) for an adapter
        that cannot run. The full check, with the file read, happens on the worker."""
        if not req.loras:
            return
        if self.lora is None:
            err = UnknownAdapter(req.loras[0].name, "this server has no LoRA directory (--lora-dir)")
            err.index = 0
            raise err
        self.lora.check(req.loras)

    def warm_up(self, width: int, height: int, edit: bool | int = False) -> float:
        """Compile / capture a request shape ahead of traffic (start-up cost, reported in /health). `edit`: the
        number of reference images (True: one), each at the output size (--warmup's editN:WxH).

        Every prepared transformer variant is warmed (exact bf16 and, with low_precision prepared, fp8: a request
        asking for it would otherwise compile it on its own time), with the server's default flags otherwise.
        Only the cold runs: a generation after them would add seconds to start-up and warm nothing more. Returns
        their milliseconds (0.0 when nothing is compiled or captured, or the shape was already warm).
        """
        refs = int(edit)
        img = [Image.new("RGB", (width, height), (128, 128, 128)) for _ in range(refs)] or None
        if refs == 1:
            img = img[0]
        total = 0.0
        for fp8 in ([False, True] if "low_precision" in self.prepared else [False]):
            req = InferenceRequest(prompt="warm-up", width=width, height=height, steps=2, seed=0,
                                   use_mxfp4=True if fp8 else None)
            plan = self.plan(req, img, new_shape_policy=False)
            ms = self.runner.warm(req, img, plan, seed=0)
            if ms is not None:
                self.warmups.append({"width": width, "height": height, "edit": refs > 0, "references": refs,
                                     "precision": self.runner.precision(plan, self.registry), "ms": round(ms, 1)})
                total += ms
        return total

    def output_size(self, req: InferenceRequest, image: Image.Image | None) -> tuple[int, int]:
        return output_size(req, image)

    def transformer_for(self, plan: dict[str, Decision]):
        """The module a request with this plan calls as its transformer (graph runner included)."""
        return self.runner.transformer_for(plan)

    def _save_compile_cache(self) -> None:
        if self.compile_cache is not None:
            try:
                self.compile_cache.save()
            except Exception as exc:  # saving is an optimisation; never fail a request for it
                log.warning("could not save compile cache: %s", exc)

    # ---- health -----------------------------------------------------------------------------------------------------
    def health(self) -> dict:
        return health_report(self)
