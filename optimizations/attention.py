"""FA3-class attention: the fastest attention kernel this machine has, through diffusers' attention dispatcher.

Preference: FA3 (`flash_attn_interface`) > cuDNN SDPA. flash-attn has no installable wheel for our GPU machines
and torch's cuDNN SDPA measures at FA3 level on Hopper (docs/design.md), so the usual result there is cuDNN.
flash-attn-4 is detected (`flash_attn.cute`) and reported, but not used: diffusers 0.42.1 reaches it only as a hub
kernel (`flash_4_hub`, a download at run time through the `kernels` package), which an offline server cannot do.
The backend is set on the transformer's attention processors at load time (before compilation), so compiled graphs
contain the kernel directly: no graph break per call. Under context parallelism (kontext_server/parallel) the backend
must call torch's SDPA, which para-attn's split attention intercepts: cuDNN, never FA3.

The attention path also gets its prologue fused: q/k RMSNorm, the text/image concatenation and RoPE in one Triton
pass (qk_norm_rope.py), on every transformer variant. Where Triton is missing or a model does not fit the kernel,
diffusers' processor stays and the detail says why.
"""
from __future__ import annotations

import importlib.util

from optimizations import qk_norm_rope
from optimizations.base import Components, DeviceInfo, Optimization


def _importable(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def best_backend(device: DeviceInfo) -> tuple[str, str]:
    """(diffusers backend name, human description)."""
    fa3 = _importable("flash_attn_interface") and device.capability and device.capability[0] == 9
    if fa3 and device.context_parallel > 1:
        # para-attn's context-parallel attention intercepts torch's SDPA; FA3 is not SDPA, so each rank would attend
        # only to its own tokens
        return "_native_cudnn", ("cuDNN SDPA (FA3 importable, but not under context parallelism: the split attention "
                                 "intercepts torch's SDPA, which FA3 bypasses)")
    if fa3:
        return "_flash_3", "FlashAttention-3 (flash_attn_interface)"
    if _importable("flash_attn.cute"):  # flash-attn-4 is installed, but diffusers cannot call a local copy
        return "_native_cudnn", ("cuDNN SDPA (FA3 not importable; flash-attn-4 is importable but diffusers 0.42.1 "
                                 "calls it only as a hub kernel downloaded at run time, so it is not used)")
    return "_native_cudnn", ("cuDNN SDPA (neither FA3 nor flash-attn-4 importable; cuDNN measured at FA3 level on "
                             "Hopper)")


class Attention(Optimization):
    name, flag, load_time = "attention", "use_flash_attention", True
    toggle = False

    def available(self, device: DeviceInfo) -> str | None:
        if not device.is_cuda:
            return "FA3-class kernels need a CUDA GPU; CPU uses PyTorch's default SDPA"
        return None

    def prepare(self, components: Components) -> str:
        backend, desc = best_backend(components.device_info)
        for module in components.variants.values():
            module.set_attention_backend(backend)
        self.backend = backend
        return (f"{desc}; diffusers backend {backend!r}; {install_fused_prologue(components.variants.values())} "
                "(load-time, always on)")


def install_fused_prologue(transformers) -> str:
    """Install the fused q/k norm + RoPE processor on every transformer given; returns the report line."""
    transformers = list(transformers)
    if not _importable("triton"):
        return "q/k norm + RoPE left to diffusers (Triton is not installed)"
    for module in transformers:
        reason = qk_norm_rope.unsupported_reason(module)
        if reason:
            return f"q/k norm + RoPE left to diffusers ({reason})"
    n = sum(qk_norm_rope.install(m) for m in transformers)
    return f"q/k RMSNorm + text/image concatenation + RoPE in one Triton pass ({n} attention modules)"
