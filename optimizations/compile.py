"""torch.compile of the transformer and the VAE encoder and decoder (inductor), with the seed's inductor flags.

Two scopes:
- `regional` (default): each transformer block is compiled in place (diffusers' `compile_repeated_blocks`: the
  19 double and 38 single blocks share two compiled graphs). Compile time drops from minutes to well under a
  minute for the full model, the glue between blocks stays eager, and the first-block cache can still skip blocks
  (it calls the compiled blocks).
- `full`: the whole transformer is one graph (`module.compile()` in place). Slightly more fusion across block
  boundaries, minutes of compile per shape, and no first-block cache (its skip decision cannot live in one graph).

Load-time and always on once prepared (compilation changes the loaded model). Compilation is lazy (first call per
shape); the service runs that call as a reported warm-up, never inside a request's timing.
"""
from __future__ import annotations

import contextlib

import torch

from optimizations.compiling import aot_regions
from optimizations.fusions import gelu_epilogue, split_proj_out
from optimizations.base import Components, Conflict, EXACT, Optimization, RunContext, bind_forward

# The seed's inductor flags (flux-fast uses the same set). conv_1x1_as_mm helps the VAE's 1x1 convolutions;
# epilogue fusion off avoids slow fused epilogues on some shapes; shape padding aligns GEMM shapes. Coordinate
# descent tuning searches tile sizes per kernel: on the full model it multiplied compile time (a regional compile
# of edit-512 took 257 s with it on an H200, see BENCHMARKS.md), so it is opt-in ("seed").
INDUCTOR_PRESETS = {
    "none": {},
    "light": dict(conv_1x1_as_mm=True, epilogue_fusion=False, shape_padding=True),
    "seed": dict(conv_1x1_as_mm=True, epilogue_fusion=False, shape_padding=True, coordinate_descent_tuning=True,
                 coordinate_descent_check_all_directions=True),
    # An experiment for the exact tier's gap to its GEMMs (bench/probe_sustained_step.py --inductor-flags autotune):
    # every GEMM autotuned between cuBLAS and inductor's Triton templates, the templates benchmarked with the
    # pointwise epilogue they would absorb (bias, gate x output + residual), so a fused GEMM is chosen only where it
    # beats cuBLAS plus the separate kernel. Not a server choice until measured.
    "autotune": dict(conv_1x1_as_mm=True, shape_padding=True, epilogue_fusion=True, max_autotune_gemm=True,
                     max_autotune_gemm_backends="ATEN,TRITON", benchmark_epilogue_fusion=True),
}


# Functions dynamo leaves in the block graphs as calls that AOTAutograd's cache refuses (private torch functions),
# with the version their behaviour is keyed by. diffusers' cuDNN / flash attention backends enter torch's
# `sdpa_kernel` context inside each block; its two helpers map backend names to SDPBackend members and set the SDPA
# backend switches. Both are pure functions of their arguments, which are constants in the graph (so part of the
# cache key). Unmarked, a warm start bypassed AOTAutograd's cache for the double- and single-block graphs (2 of 3,
# H100, BENCHMARKS.md) and traced both again, although inductor's FX graph cache had their code.
CACHEABLE_GRAPH_FUNCTIONS = ("torch.nn.attention._backend_from_string", "torch.nn.attention._sdpa_kernel")


def mark_graph_functions_cacheable() -> None:
    import torch._inductor.config as ic

    ic.unsafe_marked_cacheable_functions.update({name: torch.__version__ for name in CACHEABLE_GRAPH_FUNCTIONS})


def apply_inductor_flags(preset: str) -> None:
    import torch._inductor.config as ic

    for k, v in INDUCTOR_PRESETS[preset].items():
        setattr(ic, k, v)


def strip_compiled(module: torch.nn.Module) -> dict:
    """Detach in-place compilation from every submodule (so the module can be deep-copied); returns what to restore."""
    saved = {}
    for m in module.modules():
        fn = m.__dict__.get("_compiled_call_impl")
        if fn is not None:
            saved[m] = fn
            m._compiled_call_impl = None
    return saved


def restore_compiled(saved: dict) -> None:
    for m, fn in saved.items():
        m._compiled_call_impl = fn


def _batch_one_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same view with a contiguous tensor's strides when batch is 1 (a size-1 dim's stride is arbitrary)."""
    if t.dim() > 1 and t.shape[0] == 1 and t.is_contiguous():
        return t[0].unsqueeze(0)  # views only: no copy, same storage and offset
    return t


def _single_block_forward_canonical(self, *args, **kwargs):
    """The single block's own forward, its two outputs re-viewed with contiguous strides (see below)."""
    encoder_hidden_states, hidden_states = self._forward_before_canonical_strides(*args, **kwargs)
    return _batch_one_contiguous(encoder_hidden_states), _batch_one_contiguous(hidden_states)


def canonical_single_block_outputs(module: torch.nn.Module) -> int:
    """Give every single block's outputs the strides the double blocks' outputs have; returns the blocks changed.

    A single block returns its text and image rows as slices of one concatenated tensor, so at batch 1 their batch
    stride is (text + image) x dim, while the double blocks' outputs are separate contiguous tensors. Compiled with
    static shapes, dynamo guards on that stride and compiles the first single block (fed by a double block) as a
    second graph: one more full single-block compile on every cold start and one more trace and cache load on
    every warm one. Re-viewing the outputs (t[0].unsqueeze(0)) moves no data. Batch > 1 slices are genuinely
    non-contiguous and keep the second graph.
    The block keeps whatever forward it has (diffusers' or a rewrite) as `_forward_before_canonical_strides`, an
    attribute rather than a closure, so a deep copy of the transformer calls its own block's forward.
    """
    n = 0
    for block in getattr(module, "single_transformer_blocks", []):
        if getattr(block.forward, "__func__", None) is _single_block_forward_canonical:
            continue
        block._forward_before_canonical_strides = block.forward
        bind_forward(block, _single_block_forward_canonical)
        n += 1
    return n


class Compile(Optimization):
    name, flag, load_time = "compile", "use_compile", True
    toggle = False  # compiled in place: the server either prepared it or not
    needs_warmup = in_warm_key = compiles_per_shape = True
    offload_conflict = ("the compiled blocks are whole graphs, without the offload hooks that stream their weights "
                        "in: the request runs eager")

    def __init__(self, mode: str = "default", inductor_flags: str = "light", compile_vae: bool = True,
                 scope: str = "regional"):
        if scope not in ("regional", "full"):
            raise ValueError(f"compile scope must be 'regional' or 'full', not {scope!r}")
        if inductor_flags not in INDUCTOR_PRESETS:
            raise ValueError(f"inductor flags preset must be one of {sorted(INDUCTOR_PRESETS)}")
        self.mode, self.inductor_flags, self.compile_vae, self.scope = mode, inductor_flags, compile_vae, scope
        self.aot: dict | None = None  # where compiled regions are saved whole (aot_regions), set by prepare
        self.aot_stats = aot_regions.Stats()  # this service's loads / compiles, for /health
        self.aot_regions: dict = {}  # block structure -> its region, shared by the transformer variants
        self.vae_regions: list = []  # the VAE's encoder and decoder when they are compiled as regions

    def conflicts(self) -> list[Conflict]:
        if self.scope == "full":  # the step cache's skip decision cannot live inside one whole-model graph
            return [Conflict("first_block_cache", drop="first_block_cache",
                             reason="not combinable with full-graph compile (start the server with "
                                    "--compile-scope regional)")]
        return []

    def _kwargs(self) -> dict:
        return dict(mode=self.mode, fullgraph=True, dynamic=False)

    def compile_transformer(self, module: torch.nn.Module) -> None:
        kwargs = self._kwargs()
        canonical_single_block_outputs(module)  # one compiled single-block graph instead of two
        if self.scope == "regional" and self.aot is not None:
            aot_regions.install_blocks(module, self.aot["directory"], self.aot["key"], kwargs, self.aot_stats,
                                       self.aot_regions)
        elif self.scope == "regional":
            module.compile_repeated_blocks(**kwargs)
        else:
            module.compile(**kwargs)

    def adopt(self, components: Components, precision: str, module) -> None:
        self.compile_transformer(module)  # a variant made after compile was prepared (the benchmark's stage order)

    def refresh(self, components: Components) -> None:
        """After another optimisation changed prepared blocks (the benchmark prepares stage by stage): a block whose
        structure changed moves to a new region (dynamo's guards do this for in-place compile)."""
        if self.aot is not None:
            for module in components.variants.values():
                self.compile_transformer(module)  # re-routes only the blocks that changed
            if self.vae_regions:
                self._install_vae_regions()

    def aot_unavailable(self, components: Components) -> str | None:
        """None when regions can be saved whole (aot_regions), else why dynamo compiles them in place."""
        blocked = getattr(components, "saved_regions_blocked", None)  # a Components field (tests pass stand-ins)
        if blocked:
            return blocked
        if not aot_regions.enabled():
            return f"{aot_regions.ENV}=0"
        if self.scope != "regional":
            return "the full-scope compile is one dynamo graph of the whole transformer"
        if components.compile_cache is None:
            return "no compile cache directory"
        return aot_regions.unsupported_reason()

    def prepare(self, components: Components) -> str:
        apply_inductor_flags(self.inductor_flags)
        mark_graph_functions_cacheable()
        bf16_notes = ""
        if gelu_epilogue.enabled():  # the exact (bf16) transformer only; an fp8 copy takes it out again
            bf16_notes = "; " + gelu_epilogue.install(components.variants[EXACT])
        if split_proj_out.bf16_enabled():  # likewise; the fp8 copy splits its proj_out into two quantised halves
            bf16_notes += "; " + split_proj_out.install_bf16(components.variants[EXACT])
        # Static shapes: one specialised graph per resolution (the fastest kernels); a server sees few sizes.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        aot_reason = self.aot_unavailable(components)
        self.aot = None if aot_reason else {"directory": components.compile_cache.path.parent / "aot",
                                            "key": components.compile_cache.key}
        for module in components.variants.values():
            self.compile_transformer(module)
        vae_note = self._compile_vae(components) if self.compile_vae else ""
        aot_note = (f"; transformer blocks saved whole and loaded without dynamo on a warm start ({aot_regions.ENV})"
                    if self.aot else f"; regions traced by dynamo on every start ({aot_reason})")
        return (f"torch.compile {self.scope} (mode={self.mode}, fullgraph, static shapes; inductor flags "
                + self.inductor_flags + ")" + aot_note + vae_note + bf16_notes + " (load-time, always on)")

    def activate(self, run: RunContext):
        if "compiled" in run.components.vae_decode:
            run.vae_encode = run.components.vae_encode["compiled"]
            run.vae_decode = run.components.vae_decode["compiled"]
        return contextlib.nullcontext()

    def bypass(self, run: RunContext):
        """Compiled in place: a request that must not run compiled code (--new-shapes eager) runs the originals."""
        return torch.compiler.set_stance("force_eager")

    def _compile_vae(self, components: Components) -> str:
        """Encode too: the reference image of an edit goes through the encoder on every request. Each compiles to
        one graph. With saved regions, the VAE's encoder and decoder modules are compiled in place and saved like the
        blocks (a warm start then traces nothing with dynamo); diffusers' encode / decode around them stay eager
        (aot_regions.py says why). Otherwise dynamo compiles encode and decode whole."""
        vae = components.pipe.vae
        modules = [getattr(vae, "encoder", None), getattr(vae, "decoder", None)]
        saved = self.aot is not None and aot_regions.vae_enabled()
        eager_encode, eager_decode = components.vae_encode["eager"], components.vae_decode["eager"]
        if saved and all(isinstance(m, torch.nn.Module) for m in modules):
            self.vae_regions = modules
            self._install_vae_regions()
            components.vae_encode["compiled"], components.vae_decode["compiled"] = eager_encode, eager_decode
            return "; VAE encode and decode compiled (its encoder and decoder saved whole)"
        components.vae_encode["compiled"] = torch.compile(eager_encode, mode=self.mode, dynamic=False)
        components.vae_decode["compiled"] = torch.compile(eager_decode, mode=self.mode, dynamic=False)
        why = (f"{aot_regions.VAE_ENV}=0" if not aot_regions.vae_enabled() else "no encoder / decoder modules")
        return "; VAE encode and decode compiled" + (f" (by dynamo: {why})" if self.aot else "")

    def _install_vae_regions(self) -> None:
        aot_regions.install_modules(self.vae_regions, self.aot["directory"], self.aot["key"], self._kwargs(),
                                    self.aot_stats, self.aot_regions)
