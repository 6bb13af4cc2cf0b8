"""Compiled regions saved whole with torch.compile's AOT API, so a warm start loads them without dynamo.

With plain `torch.compile`, a warm start still re-traces every region's bytecode with dynamo and rebuilds its
guards before inductor's cache hit: 2.3-2.9 s of a 14-17 s second start on the H100 (BENCHMARKS.md).
`torch.compile(fn, fullgraph=True).aot_compile(example_inputs)` traces, compiles and packages one region for given
inputs; `torch.compiler.load_compiled_function` loads the package back as a callable, skipping dynamo. vLLM uses the
same API for the same reason. It is experimental in torch (off by default on 2.11, hence the config switch below).

One `AOTRegion` per block class and structure (the double and the single block of each transformer variant), one
package per input signature: shapes, strides and dtypes, as dynamo's static-shape compile specialises. The
package's file name carries
- the caller's cache key (torch / triton version, device, model config, prepared optimisations, compile settings),
- `code_key()`: the diffusers / transformers / torchao versions and a hash of this repo's code that runs inside
  compiled regions (optimizations/, patches/),
- the region's structure (`module_structure`) and the input signature.
At load, every source file dynamo inlined when the package was made must still hash the same (torch records them);
otherwise the region compiles again. A package that fails to load compiles again too; one that fails to compile
or save leaves that signature to dynamo (`torch.compile` in place, as without this module). Nothing here can fail
a request that plain compile would have served.

The VAE's encoder and decoder modules are regions too (`install_modules`), called by diffusers' own encode /
decode, which stay eager: a package of those decorated methods could not be pickled (torch 2.13), and one of the
undecorated function needed globals that dynamo names by object id, which a new process cannot supply. What runs
outside the two modules is a few small tensor ops (the latent distribution's split, the output dataclass).

Guards: the package keeps dynamo's serialisable guards (tensor shapes, strides and dtypes of the inputs and
parameters, constants) and drops what cannot be serialised: globals and identity guards, such as the attention
processor's `__call__`. Every such object is fixed at load time by the prepared optimisation set, which is in the
file name. The kept guards are checked once per (owner, signature), the first time an owner (a block) meets it;
after that a call costs a signature lookup. So a block must not change under its region: `module_structure`
fingerprints what the code depends on beyond the inputs (module tree, parameter shapes, instance forwards,
attention processors), and `install_modules`, run again after every prepare, moves a changed block to a new region.

`torch.compiler.set_stance` is honoured as dynamo honours it: "force_eager" (the service's --new-shapes eager)
runs the block's own code, "eager_on_recompile" loads saved packages but compiles nothing.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

import optimizations
import patches
from kontext_server import settings

log = logging.getLogger("flux.aot_regions")

ENV = settings.AOT_REGIONS.name  # "0": regions compile with dynamo in place, as before this module
VAE_ENV = settings.AOT_VAE.name  # "0": the VAE's encode / decode compile with dynamo (A/B)
# Our code that can run inside a compiled region: every module of these packages is part of the key.
CODE_DIRS = tuple(Path(pkg.__file__).resolve().parent for pkg in (optimizations, patches))


def enabled() -> bool:
    return not settings.AOT_REGIONS.off()


def vae_enabled() -> bool:
    return enabled() and not settings.AOT_VAE.off()


def unsupported_reason() -> str | None:
    """None when this torch can save and load compiled regions, else why not."""
    if not hasattr(torch.compiler, "load_compiled_function"):
        return f"torch {torch.__version__} has no torch.compiler.load_compiled_function"
    return None


@functools.cache
def code_key() -> str:
    """Versions and sources a package depends on beyond torch's own checks (see the module docstring)."""
    h = hashlib.sha256()
    for pkg in ("diffusers", "transformers", "torchao"):
        try:
            h.update(f"{pkg}={importlib.import_module(pkg).__version__};".encode())
        except Exception:
            h.update(f"{pkg}=none;".encode())
    for d in CODE_DIRS:
        for p in sorted(d.rglob("*.py")):
            h.update(f"{d.name}/{p.relative_to(d).as_posix()}".encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _stance() -> str:
    """torch.compiler.set_stance's current stance (no public getter): regions honour it as dynamo does."""
    return getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", "default")


class UnsupportedInput(TypeError):
    """An argument the signature cannot describe: the call goes to dynamo, which guards on anything."""


def _describe(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.stride(), str(x.dtype), x.device.type, x.requires_grad)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (tuple, list)):
        return (type(x).__name__, tuple(_describe(v) for v in x))
    if isinstance(x, dict):
        return ("dict", tuple((k, _describe(v)) for k, v in x.items()))
    raise UnsupportedInput(type(x).__name__)


def input_signature(args: tuple, kwargs: dict) -> tuple:
    """What a static-shape compile specialises on, hashable and the same in every process."""
    return (_describe(args), _describe(kwargs), torch.is_grad_enabled(), torch.is_inference_mode_enabled())


def _qualname(obj: Any) -> str:
    fn = getattr(obj, "__func__", obj)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _simple_attrs(obj: Any) -> tuple:
    return tuple(sorted((k, v) for k, v in vars(obj).items()
                        if v is None or isinstance(v, (bool, int, float, str))))


def module_structure(module: torch.nn.Module) -> str:
    """What a block's compiled code depends on besides its inputs: the module tree, every parameter's and buffer's
    shape, strides and dtype (the weights are inputs of the compiled graph, not constants, so blocks with the same
    structure share a package), every instance-level forward, and each attention processor's class and settings
    (diffusers keeps processors outside the module tree, and the attention optimisation swaps them)."""
    parts: list = [repr(module)]
    for name, m in module.named_modules():
        if "forward" in m.__dict__:
            parts.append((name, "forward", _qualname(m.__dict__["forward"])))
        proc = getattr(m, "processor", None)
        if proc is not None and not isinstance(proc, torch.nn.Module):
            parts.append((name, "processor", _qualname(type(proc)), _simple_attrs(proc)))
    parts.append([(n, tuple(t.shape), t.stride(), str(t.dtype)) for n, t in  # strides: channels-last weights
                  list(module.named_parameters()) + list(module.named_buffers())])
    return repr(parts)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _sources_unchanged(entry) -> str | None:
    """None when every source dynamo inlined for `entry` still hashes the same, else the first that does not."""
    try:
        infos = entry.source_info().inlined_sources
    except Exception as exc:  # an older package format: nothing to check against, so do not trust it
        return f"no source record ({exc})"
    for src in infos:
        try:
            lines = inspect.getsourcelines(importlib.import_module(src.module))[0]
            digest = hashlib.sha256("".join(lines[src.firstlineno - 1:src.lastlineno - 1]).encode()).hexdigest()
        except Exception as exc:
            return f"{src.module}: {exc}"
        if digest != src.checksum:
            return f"{src.module} lines {src.firstlineno}-{src.lastlineno} changed"
    return None


def _serialisable_guards(entries) -> list[bool]:
    """Keep the guards a package can carry (see the module docstring); torch's own default misses guards whose
    derived type is an identity match, and then refuses to save."""
    from torch._dynamo.guards import CheckFunctionManager

    bad = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    return [not (e.is_global or e.guard_type in bad or bad.intersection(e.derived_guard_types or ()))
            for e in entries]


class Stats:
    """Counts for /health and the cold-start tool, over the regions of one service."""

    def __init__(self):
        self.loaded = self.compiled = self.saved = self.to_dynamo = 0
        self.load_seconds = self.compile_seconds = 0.0
        self.notes: list[str] = []

    def note(self, msg: str) -> None:
        log.warning(msg)
        if len(self.notes) < 20:
            self.notes.append(msg)

    def as_dict(self) -> dict:
        return {"loaded": self.loaded, "compiled": self.compiled, "saved": self.saved, "to_dynamo": self.to_dynamo,
                "load_seconds": round(self.load_seconds, 3), "compile_seconds": round(self.compile_seconds, 3),
                "notes": list(self.notes)}


class AOTRegion:
    """One compiled function for owners of one structure: packages per input signature, on disk under `directory`.

    Called as region(bound_method, *args, **kwargs), where bound_method.__self__ is the owner (a block).
    """

    def __init__(self, name: str, directory: Path, cache_key: str, compile_kwargs: dict, structure: str,
                 stats: Stats):
        self.name, self.directory, self.stats = name, Path(directory), stats
        self.compile_kwargs = dict(compile_kwargs)
        self.prefix = f"{name}-{_digest(cache_key, code_key(), structure, self.compile_kwargs)}"
        self.entries: dict[tuple, Any] = {}  # signature -> loaded or compiled package (None: dynamo's)
        self.checked: dict[tuple, bool] = {}  # (id(owner), signature) -> the package's guards pass
        self._dynamo: dict[tuple, Callable] = {}  # (id(owner), function) -> torch.compile of that bound method

    # -- the call path ------------------------------------------------------------------------------------------
    def __call__(self, bound: Callable, *args, **kwargs):
        owner = bound.__self__
        stance = _stance()
        if stance == "force_eager":  # the service runs an unwarmed shape uncompiled (--new-shapes eager)
            return bound(*args, **kwargs)
        try:
            sig = input_signature(args, kwargs)
        except UnsupportedInput:
            return self.dynamo(bound)(*args, **kwargs)
        if sig not in self.entries and stance != "default" and not self.path(sig).exists():
            if stance == "fail_on_recompile":
                raise RuntimeError(f"{self.name}: a new input signature would compile under fail_on_recompile")
            return bound(*args, **kwargs)  # eager_on_recompile: loading a saved package is not compiling
        entry = self.entries[sig] if sig in self.entries else self._entry(sig, bound, args, kwargs)
        if entry is None:
            return self.dynamo(bound)(*args, **kwargs)
        key = (id(owner), sig)
        ok = self.checked.get(key)
        if ok is None:
            ok = self.checked[key] = bool(entry.guard_check(owner, *args, **kwargs))
            if not ok:
                self.stats.to_dynamo += 1
                self.stats.note(f"{self.name}: an owner failed the package's guards; dynamo compiles it")
        if not ok:
            return self.dynamo(bound)(*args, **kwargs)
        return entry(owner, *args, **kwargs)

    def dynamo(self, bound: Callable) -> Callable:
        # Keyed by the function too: a block's forward and its _call_impl (taken when it has hooks) are two compiles.
        key = (id(bound.__self__), bound.__func__)
        fn = self._dynamo.get(key)
        if fn is None:
            fn = self._dynamo[key] = torch.compile(bound, **self.compile_kwargs)
        return fn

    # -- packages -----------------------------------------------------------------------------------------------
    def path(self, sig: tuple) -> Path:
        return self.directory / f"{self.prefix}-{_digest(sig)}.bin"

    def _entry(self, sig: tuple, bound: Callable, args: tuple, kwargs: dict):
        path = self.path(sig)
        entry = self._load(path) if path.exists() else None
        if entry is None:
            entry = self._compile(path, bound, args, kwargs)
        if entry is not None:
            entry.disable_guard_check()  # checked once per owner in __call__
        self.entries[sig] = entry
        return entry

    def _load(self, path: Path):
        t0 = time.perf_counter()
        try:
            with open(path, "rb") as fh:
                entry = torch.compiler.load_compiled_function(fh)
            stale = _sources_unchanged(entry)
        except Exception as exc:  # corrupt, or from another torch: compile again
            self.stats.note(f"{self.name}: could not load {path.name} ({type(exc).__name__}: {exc}); compiling")
            return None
        finally:
            self.stats.load_seconds += time.perf_counter() - t0
        if stale:
            self.stats.note(f"{self.name}: {path.name} is stale ({stale}); compiling")
            return None
        self.stats.loaded += 1
        return entry

    def _compile(self, path: Path, bound: Callable, args: tuple, kwargs: dict):
        t0 = time.perf_counter()
        kw = dict(self.compile_kwargs)
        mode = kw.pop("mode", None)
        # torch.compile takes a mode or options, not both: the guard filter, plus inductor's options for the mode
        options = {"guard_filter_fn": _serialisable_guards}
        if kw.get("backend", "inductor") == "inductor" and mode not in (None, "default"):
            options.update(torch._inductor.list_mode_options(mode))
        try:
            with torch._dynamo.config.patch(enable_aot_compile=True):  # off by default on torch 2.11
                entry = torch.compile(bound, options=options, **kw).aot_compile((args, kwargs))
        except Exception as exc:
            self.stats.to_dynamo += 1
            self.stats.note(f"{self.name}: AOT compile failed ({type(exc).__name__}: {str(exc)[:300]}); "
                            "dynamo compiles this shape")
            return None
        finally:
            self.stats.compile_seconds += time.perf_counter() - t0
        self.stats.compiled += 1
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            entry.save_compiled_function(str(tmp))
            os.replace(tmp, path)  # readers never see a half-written package
            self.stats.saved += 1
        except Exception as exc:  # it still runs in this process; the next start compiles again
            self.stats.note(f"{self.name}: could not save {path.name} ({type(exc).__name__}: {str(exc)[:300]})")
        return entry


def _module_call(region: AOTRegion, module: torch.nn.Module, *args, **kwargs):
    """A module's call through its region; a module with hooks goes to dynamo, which traces them (the package does
    not: it holds the module's forward)."""
    from torch.nn.modules import module as nn_module

    if (module._forward_hooks or module._forward_pre_hooks or nn_module._global_forward_hooks
            or nn_module._global_forward_pre_hooks):
        return region.dynamo(module._call_impl)(*args, **kwargs)
    return region(module.forward, *args, **kwargs)


def install_modules(modules, directory: Path, cache_key: str, compile_kwargs: dict, stats: Stats,
                    regions: dict[str, AOTRegion]) -> int:
    """Route each of `modules` through the region of its structure, shared by the modules of one structure as
    `compile_repeated_blocks` shares dynamo's graphs (in place, as `nn.Module.compile`: the module's
    `_compiled_call_impl`). `regions` (structure -> region) persists between calls: call again after anything
    changes the modules (the service does after each prepare), and a module whose structure changed gets another
    region, so it compiles anew instead of running code compiled for what it was (the packages' guards are checked
    once per module and signature). Returns the modules re-routed."""
    n = 0
    for module in modules:
        structure = f"{_qualname(module.forward)}|{module_structure(module)}"
        region = regions.get(structure)
        if region is None:
            region = regions[structure] = AOTRegion(type(module).__name__, directory, cache_key, compile_kwargs,
                                                    structure, stats)
        current = module.__dict__.get("_compiled_call_impl")
        if isinstance(current, functools.partial) and current.args and current.args[0] is region:
            continue
        module._compiled_call_impl = functools.partial(_module_call, region, module)
        n += 1
    return n


def install_blocks(transformer: torch.nn.Module, directory: Path, cache_key: str, compile_kwargs: dict,
                   stats: Stats, regions: dict[str, AOTRegion]) -> int:
    """install_modules for every repeated block of `transformer` (diffusers' `_repeated_blocks`)."""
    names = set(getattr(transformer, "_repeated_blocks", ()) or ())
    blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    return install_modules(blocks, directory, cache_key, compile_kwargs, stats, regions)
