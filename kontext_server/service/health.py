"""What /health reports about a service: state, model, device, the optimisations prepared and why others were not,
the transformer variants and their bytes, warm-ups, compile-cache and start-up decisions."""
from __future__ import annotations

from typing import Any

from kontext_server import settings
from kontext_server.service import references
from kontext_server.startup import bytecode_cache, cublaslt_workspace, quiet
from optimizations.registry import STACK_ORDER


def health_report(service) -> dict:
    info: dict[str, Any] = {"status": service.state, "device": service.device, "device_name": service.device_info.name}
    if service.error:
        info["error"] = service.error
    if service.model is not None:
        m = service.model
        info["model"] = {"source": m.source, "synthetic": m.synthetic, "description": m.description,
                         "load_seconds": round(m.load_seconds, 2), "load_stage_seconds": m.stage_seconds,
                         "origin": m.origin, "transformer_file": m.transformer_file, "host_memory": m.host_memory}
        info["dtype"] = str(service.pipe.transformer.dtype).replace("torch.", "")
    registry = service.registry
    info["optimizations"] = {
        name: {"prepared": name in service.prepared, "load_time": registry[name].load_time,
               "detail": service.prepared.get(name) or registry[name].available(service.device_info)
               or "not prepared at start-up",
               "prepare_seconds": round(service.prepare_seconds.get(name, 0.0), 2)}
        for name in STACK_ORDER}
    info["transformer_variants"] = sorted(service.transformer_variants)
    info["transformer_variant_bytes"] = service.transformer_variant_bytes
    cache = service.compile_cache
    if cache is not None:
        info["compile_cache"] = {"key": cache.key, "loaded": cache.loaded, "detail": cache.load_detail,
                                 "saved_bytes": cache.saved_bytes, "load_seconds": round(cache.load_seconds, 3),
                                 "save_seconds": round(cache.save_seconds, 3), "saves": cache.saves,
                                 "saves_skipped": cache.saves_skipped,
                                 "inductor_cache_dir": settings.INDUCTOR_CACHE_DIR.get(),
                                 "aot_regions": registry["compile"].aot_stats.as_dict(), **cache.counters(),
                                 "lock": service.compile_lock}
    info["bytecode_cache"] = bytecode_cache.status
    if service.device_info.is_cuda:  # a CPU runs no cuBLASLt GEMM: the setting would mean nothing there
        info["cublaslt_workspace"] = cublaslt_workspace.status
    info["library_messages_dropped"] = dict(quiet.counts)  # known-harmless start-up lines (docs/operations.md)
    info["warmup_ms_total"] = round(service.warmup_ms_total, 1)
    info["warmups"] = service.warmups
    info["load_fixes"] = service.load_fixes
    info["reference_images"] = references.health_info()
    if service.lora is not None:
        info["lora"] = service.lora.health()
    if getattr(service, "memory_tier", None) is not None:  # --memory-budget: what is resident or offloaded, how, why
        info["memory_tier"] = {**service.memory_tier.as_dict(), "applied": service.memory_tier_applied}
    elif getattr(service, "memory_tier_note", None) is not None:
        info["memory_tier"] = {"budget": service.budget.spec, "note": service.memory_tier_note}
    if service.device_info.is_cuda:
        import torch

        info["gpu_memory_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    return info
