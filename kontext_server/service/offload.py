"""Putting a memory tier (memory_tiers.py) in place on the loaded components, with diffusers' own offloading.

What, in two steps around the optimisations' prepare (the model was loaded into host memory):
- `place_for_prepare`: the components the tier keeps resident move to the device, so that the optimisations prepare
  them where they will run; the fp8 copy is quantised linear by linear on the device (`Components.quantise_device`)
  from the exact transformer wherever it lives, each linear kept where the tier holds the copy
  (`Components.variant_homes`); `Components.device` and `Components.offloaded` tell the optimisations where requests
  compute and what is offloaded;
- `apply`: after prepare, the fp8 copy goes where the tier says, the AdaLN modulation weights of a transformer that
  keeps them on the host leave its module tree (pinned host tensors that the modulation table's fill copies in, so
  no hook streams them per step), offloaded components get `diffusers.hooks.apply_group_offloading` (transformers
  block level, T5 leaf level; CUDA streams with record_stream on a GPU, plain moves on a CPU, where diffusers allows
  no streams), and the VAE gets `enable_tiling` with the tier's tile size.
`reset` returns every offloaded group to the host after a failed request (an out-of-memory one stops mid-forward,
before the hooks that offload), so the memory is free for the next request.
Contract: runs on the worker thread at load; nothing here chooses: the tier did.
"""
from __future__ import annotations

import logging

import torch

from kontext_server.service.memory_tiers import (CLIP, T5, TRANSFORMER, TRANSFORMER_FP8, VAE, MemoryTier,
                                                 variant_component)
from optimizations.base import EXACT, Components
from optimizations.modulation_table import ModulationLinear

log = logging.getLogger("flux.service")
_GROUP_OFFLOADING, _LAZY_PREFETCH = "group_offloading", "lazy_prefetch_group_offloading"  # diffusers' hook names


def _host(t: torch.Tensor) -> torch.Tensor:
    """`t` in host memory, pinned where CUDA is (the copies in are then asynchronous)."""
    t = t.detach().to("cpu")
    return t.pin_memory() if torch.cuda.is_available() else t


def place_for_prepare(components: Components, tier: MemoryTier, device: str) -> None:
    pipe = components.pipe
    for name in (VAE, CLIP, T5, TRANSFORMER):
        placement = tier.placements.get(name)
        if placement is not None and placement.resident:
            getattr(pipe, name).to(device)
    components.device = device
    components.quantise_device = device if device.startswith("cuda") else None
    fp8 = tier.placements.get(TRANSFORMER_FP8)
    if fp8 is not None:
        components.variant_homes = {"fp8": device if fp8.resident else "cpu"}
    components.offloaded = tier.offloaded()


def modulation_to_host(module: torch.nn.Module) -> int:
    """Take the modulation linears' weights out of `module`'s tree into host memory (see the module docstring);
    returns the bytes moved. Their forward reads the table, never the weights."""
    moved = 0
    for m in module.modules():
        if isinstance(m, ModulationLinear):
            for name in ("weight", "bias"):
                p = m._parameters.pop(name, None)
                if p is not None:
                    host = _host(p.data)
                    object.__setattr__(m, name, host)
                    moved += host.numel() * host.element_size()
    return moved


def _group_offload(module: torch.nn.Module, device: str, offload_type: str) -> None:
    from diffusers.hooks import apply_group_offloading

    streams = device.startswith("cuda")
    apply_group_offloading(module, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                           offload_type=offload_type, num_blocks_per_group=1 if offload_type == "block_level" else None,
                           use_stream=streams, record_stream=streams)


def apply(components: Components, tier: MemoryTier, device: str, modulation_table: bool) -> dict:
    """After prepare: the placements the tier chose (module docstring). Returns what was done, for /health."""
    done: dict = {}
    for precision, module in components.variants.items():
        name = variant_component(precision)
        placement = tier.placements[name]
        if modulation_table and (placement.modulation_on_host or not placement.resident):  # first: never on the device
            done[f"{name}_modulation_on_host_bytes"] = modulation_to_host(module)
        if precision != EXACT:  # a copy made at prepare (its quantised linears on the device, the rest where it was)
            module.to(device if placement.resident else "cpu")
        if not placement.resident:
            _group_offload(module, device, "block_level")
            done[name] = "group offloading, block level"
    if not tier.placements[T5].resident:
        _group_offload(components.pipe.text_encoder_2, device, "leaf_level")
        done[T5] = "group offloading, leaf level"
    if tier.vae_tile is not None:
        vae = components.pipe.vae
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = tier.vae_tile, tier.vae_tile // scale
        done[VAE] = f"tiled above {tier.vae_tile} px"
    done["streams"] = device.startswith("cuda")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    log.info("memory tier %s: %s", tier.spec, tier.summary())
    return done


def offloaded_modules(components: Components) -> list[torch.nn.Module]:
    modules = [components.variants[p] for p in components.variants
               if variant_component(p) in components.offloaded]
    if T5 in components.offloaded:
        modules.append(components.pipe.text_encoder_2)
    return modules


def reset(components: Components) -> None:
    """After a failed request: every offloaded group back on the host, and a first-call trace cut short forgotten
    (diffusers records the execution order on the first forward to prefetch in it)."""
    for module in offloaded_modules(components):
        for m in module.modules():
            registry = getattr(m, "_diffusers_hook", None)
            if registry is None:
                continue
            hook = registry.get_hook(_GROUP_OFFLOADING)
            if hook is not None:
                hook.group.offload_()
            lazy = registry.get_hook(_LAZY_PREFETCH)
            if lazy is not None:
                lazy.execution_order.clear()
