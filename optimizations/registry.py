"""The ordered optimisation registry.

STACK_ORDER is the order the seed's stage table lists them in (and the order responses report them).
PREPARE_ORDER is the order they are applied at load time: compile must wrap what fusion, attention choice and
quantisation produced, and the step cache attaches to the final eager modules, so those come last.
"""
from __future__ import annotations

from optimizations.attention import Attention
from optimizations.base import DeviceInfo, Optimization
from optimizations.channels_last import ChannelsLast
from optimizations.compile import Compile
from optimizations.cuda_graphs import CudaGraphs
from optimizations.dpm_solver import DPMSolver
from optimizations.low_precision import LowPrecision
from optimizations.modulation_table import ModulationTable
from optimizations.qkv_fusion import QKVFusion
from optimizations.first_block_cache import FirstBlockCacheOpt

STACK_ORDER = ["compile", "qkv_fusion", "channels_last", "modulation_table", "first_block_cache", "attention",
               "low_precision", "dpm_solver", "cuda_graphs"]
PREPARE_ORDER = ["qkv_fusion", "channels_last", "attention", "low_precision", "modulation_table", "compile",
                 "first_block_cache", "dpm_solver", "cuda_graphs"]
# What `--optimizations auto` prepares: everything the device supports; on CPU none of the load-time ones
# (they change the loaded model for no benefit at tiny size: ask for them by name). The per-request ones
# (step cache, DPM-Solver++) stay available everywhere.
NOT_AUTO_ON_CPU = {"compile", "qkv_fusion", "channels_last", "modulation_table"}


def build_registry(compile_mode: str = "default", compile_vae: bool = True, compile_scope: str = "regional",
                   inductor_flags: str = "light", dpm_default_steps: int = 14) -> dict[str, Optimization]:
    """One registry per service: the optimisation objects hold that service's prepared state."""
    opts = [Compile(mode=compile_mode, compile_vae=compile_vae, scope=compile_scope, inductor_flags=inductor_flags),
            QKVFusion(), ChannelsLast(), ModulationTable(compile_scope), FirstBlockCacheOpt(), Attention(),
            LowPrecision(), DPMSolver(dpm_default_steps), CudaGraphs()]
    reg = {o.name: o for o in opts}
    assert list(reg) == STACK_ORDER
    return reg


def resolve_names(spec: str, registry: dict[str, Optimization], device: DeviceInfo) -> list[str]:
    """`all` | `none` | `auto` | comma list -> names to prepare, in PREPARE_ORDER. Unknown names raise."""
    spec = (spec or "auto").strip().lower()
    if spec == "none":
        return []
    if spec == "all":
        names = set(registry)
    elif spec == "auto":
        names = {n for n, o in registry.items() if o.available(device) is None}
        if not device.is_cuda:
            names -= NOT_AUTO_ON_CPU
    else:
        names = {n.strip() for n in spec.split(",") if n.strip()}
        unknown = names - set(registry)
        if unknown:
            raise ValueError(f"unknown optimisation(s) {sorted(unknown)}; known: {', '.join(STACK_ORDER)}")
    return [n for n in PREPARE_ORDER if n in names]
