"""The optimisation interface: every optimisation is a small object behind a request flag.

What an optimisation is (one subclass of `Optimization` per registry entry, registry.py orders them):
- a name, the request flag that selects it, whether it is load-time (changes weights or compiled code: prepared once
  at start-up, then always on where `toggle` is False) or per-request, whether it is lossy (fidelity is reported);
- `available(device)`: None, or why it cannot run here;
- `prepare(components)`: load-time work on the loaded `Components`; returns the detail /health and responses show;
- `conflicts()`: the optimisations it cannot run with in one request, and which of the two yields (the planner
  applies them: the service never names a pair);
- per request, for the optimisations a request's plan applies, in stack order: `configure(run)` (decisions taken
  before the pipeline call is built: which transformer variant, how many steps by default) and `activate(run)`, a
  context manager that applies it for this call only; `bypass(run)` for one prepared but not applied.

Contract: everything `activate` and `bypass` change is undone when their context exits, so no request leaks into the
next (tests/optimizations/test_contract.py runs this over every registry entry). Optimisations meet the server only
through `Components` and `RunContext`; they never import the service.
"""
from __future__ import annotations

import contextlib
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping


_UNINITIALISED = threading.local()  # linears_uninitialised: on in this thread while its block runs


@contextlib.contextmanager
def linears_uninitialised():
    """Every torch.nn.Linear this thread builds inside skips its random initialisation (reset_parameters). For
    rewrites that copy every weight in right after building the linear (diffusers' fuse_qkv_projections,
    SplitProjOut): on a transformer a memory budget keeps in host memory, that initialisation ran on the CPU over
    billions of weights, only to be overwritten. Per thread: another thread building a linear meanwhile (a second
    service loading in the same process) still initialises it."""
    import torch

    if not getattr(torch.nn.Linear.reset_parameters, "_skips_when_uninitialised", False):
        original = torch.nn.Linear.reset_parameters

        def reset_parameters(self):
            if not getattr(_UNINITIALISED, "on", False):
                original(self)

        reset_parameters._skips_when_uninitialised = True
        torch.nn.Linear.reset_parameters = reset_parameters
    before = getattr(_UNINITIALISED, "on", False)
    _UNINITIALISED.on = True
    try:
        yield
    finally:
        _UNINITIALISED.on = before


# The transformer variant of the exact tier: the model's own weights (bf16 on a GPU, float32 on a CPU, where bf16
# matmuls are slow). Low-precision copies are keyed by their format ("fp8").
EXACT = "exact"


@dataclass
class DeviceInfo:
    type: str  # "cuda" or "cpu"
    name: str  # e.g. "NVIDIA H100 80GB HBM3" or "cpu"
    capability: tuple[int, int] | None  # CUDA compute capability, None on CPU
    # Ranks one request is split over (context parallelism, kontext_server/parallel): an optimisation that cannot run
    # split says why in `available` when this is above 1.
    context_parallel: int = 1

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"

    @classmethod
    def detect(cls, device: str, context_parallel: int = 1) -> "DeviceInfo":
        import torch

        if device.startswith("cuda"):
            idx = torch.device(device).index or 0
            return cls("cuda", torch.cuda.get_device_name(idx), torch.cuda.get_device_capability(idx),
                       context_parallel)
        return cls("cpu", "cpu", None, context_parallel)


@dataclass
class Decision:
    """What a request gets from one optimisation: whether it asked (or the server default did), whether it runs,
    and the detail the response reports (what ran, or why not)."""
    requested: bool
    applied: bool
    detail: str


@dataclass(frozen=True)
class Conflict:
    """Two optimisations that cannot run in one request: when both would apply, `drop` does not, for `reason`."""
    other: str
    drop: str
    reason: str


@dataclass
class Components:
    """The loaded model as the optimisations see it (the service builds it; `prepare` acts on it).

    `variants` holds the transformer per precision (EXACT always: the exact tier; "fp8" once low-precision GEMMs
    are prepared); a new variant goes through `add_variant`, so optimisations prepared earlier adopt it. The VAE's
    encode / decode functions are kept by kind ("eager"; "compiled" once compile prepares them)."""
    pipe: Any  # diffusers FluxKontextPipeline
    device_info: DeviceInfo
    variants: dict[str, Any] = field(default_factory=dict)
    vae_encode: dict[str, Callable] = field(default_factory=dict)
    vae_decode: dict[str, Callable] = field(default_factory=dict)
    compile_cache: Any = None  # optimizations.compiling.cache.CompileCache, opened by the service for compile
    # optimizations.fp8.stored.StoredFp8: the weights the transformer's file stored in fp8 (None: none), which the
    # fp8 copy takes instead of quantising the upcast weights again
    stored_fp8: Any = None
    on_new_variant: list[Callable[[str, Any], None]] = field(default_factory=list)
    # Why compiled regions may not be saved whole (set by the server before compile is prepared, e.g. LoRA slots:
    # their active adapter count is an int attribute the traced code depends on); None: they may.
    saved_regions_blocked: str | None = None
    # A memory budget (kontext_server/service/memory_tiers.py) loads the model into host memory and places it:
    # `device` is where requests compute (None: where the exact variant's weights are), `quantise_device` where a
    # low-precision copy's linears are quantised one by one when the exact weights live on the host (None: where
    # they are), `variant_homes` where such a copy keeps them (precision -> device), `offloaded` the components
    # streamed in from the host when they run (component -> how; names as memory_tiers.py gives them: the
    # pipeline's attributes, "transformer_fp8" for the fp8 copy). All unset without a budget.
    device: str | None = None
    quantise_device: str | None = None
    variant_homes: dict[str, str] = field(default_factory=dict)
    offloaded: dict[str, str] = field(default_factory=dict)

    def add_variant(self, precision: str, module) -> None:
        self.variants[precision] = module
        for listener in self.on_new_variant:
            listener(precision, module)


@dataclass
class RunContext:
    """One request's generation as it passes through the optimisations (worker thread only).

    `configure` may set `precision`, `default_steps` and `scheduler`; `activate` may replace `transformer` (what the
    pipeline calls), `vae_encode` / `vae_decode`, edit `call_kwargs`, leave per-request results in `report` (e.g. the
    first-block cache's step counts) and, in `details`, what its reported detail gains (e.g. the threshold used).
    `graph_key` says what else changes the computation of a call with given tensor shapes (e.g. how many LoRA
    adapters are active): whatever captures per call shape (CUDA graphs) keys on it too; set before the optimisations
    activate, and only extended."""
    components: Components
    request: Any  # the validated request (kontext_server.request.InferenceRequest)
    plan: Mapping[str, Decision]
    precision: str = EXACT  # which transformer variant this request runs
    default_steps: int | None = None  # steps when the request gives none (None: the pipeline's default)
    call_kwargs: dict = field(default_factory=dict)  # keyword arguments of the pipeline call
    transformer: Any = None
    vae_encode: Callable | None = None
    vae_decode: Callable | None = None
    report: dict = field(default_factory=dict)
    # Context parallelism (kontext_server/parallel/adapter.py), None in one process: `reduce_token_sums(*tensors)`
    # sums (batch, tokens, channels) tensors over the image tokens of the whole sequence, on every rank alike, so
    # that a data-dependent decision (the first-block cache's skip) is the same on all ranks.
    collective: Any = None
    graph_key: tuple = ()
    # The scheduler the request runs ("euler", the pipeline's own; "dpm_solver" when DPM-Solver++ configures it): what
    # a setting tuned per scheduler reads (the first-block cache's default threshold).
    scheduler: str = "euler"
    # What an applied optimisation adds to its Decision's detail once the request ran (e.g. the threshold the step
    # cache used): the runner appends it to the reported detail.
    details: dict = field(default_factory=dict)

    @property
    def variant(self):
        """The transformer module of this request's precision (before any wrapper such as a CUDA-graph runner)."""
        return self.components.variants[self.precision]


class Optimization:
    name: str = ""
    flag: str = ""  # request field that selects it, e.g. "use_compile"
    load_time: bool = True
    lossy: bool = False  # changes numerics beyond float reordering: fidelity must be reported
    toggle: bool = True  # once prepared, can a request turn it off? (False: in-place change, always on)
    # Why it cannot run on a transformer variant that a memory budget offloads (its weights streamed in per block
    # by hooks), or None when it can: the planner then does not apply it to such a request, with this reason.
    offload_conflict: str | None = None
    # Compiled or captured per input shape: a request at a new shape first runs a short warm-up (a cold start).
    needs_warmup: bool = False
    # Its being applied changes what a shape's warm-up compiles or captures (part of the warm-up key).
    in_warm_key: bool = False
    # The first request at a shape compiles (minutes on the full model): --new-shapes eager may run it without.
    compiles_per_shape: bool = False

    def available(self, device: DeviceInfo) -> str | None:
        """None when this optimisation can run on `device`, else the reason it cannot."""
        return None

    def prepare(self, components: Components) -> str:
        """Load-time work (runs once, at start-up). Returns a short detail for /health and responses."""
        return "prepared"

    def conflicts(self) -> list[Conflict]:
        """The optimisations this one cannot run with in one request (see Conflict)."""
        return []

    def adopt(self, components: Components, precision: str, module) -> None:
        """A transformer variant was made after this was prepared (e.g. the fp8 copy): apply to it as well."""

    def refresh(self, components: Components) -> None:
        """Other optimisations were just prepared after this one (the benchmark prepares stage by stage)."""

    def configure(self, run: RunContext) -> None:
        """Decisions taken before the pipeline call is built (applied optimisations only, in stack order)."""

    def activate(self, run: RunContext) -> ContextManager:
        """Apply it for one call only; everything it changes is undone on exit."""
        return contextlib.nullcontext()

    def bypass(self, run: RunContext) -> ContextManager:
        """Prepared but not applied to this request: make sure it does not run (e.g. compiled code in place)."""
        return contextlib.nullcontext()


def bind_forward(module, fn) -> None:
    """Give one module instance its own forward: `module.forward = fn` bound to it.

    fn is renamed "forward": torch's guard serialiser (used when a compiled region is saved whole, aot_regions.py)
    finds a bound method again as getattr(owner, method.__func__.__name__), and fails on any other name.
    """
    fn.__name__ = "forward"
    module.forward = types.MethodType(fn, module)
