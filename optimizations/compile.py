"""torch.compile of the transformer and the VAE decoder (inductor), with the seed's inductor flags.

Load-time: a compiled wrapper is made for every transformer variant (bf16, fp8) and for `vae.decode`. The eager
modules stay, so a request can still run uncompiled (`use_compile: false`). Compilation itself is lazy (first
call per shape); the service runs that first call as a reported warm-up, never inside a request's timing.
"""
from __future__ import annotations

import torch

from .base import DeviceInfo, Optimization, RunContext

# The seed's inductor flags (flux-fast uses the same set). conv_1x1_as_mm helps the VAE's 1x1 convolutions;
# coordinate descent tunes tile sizes further; epilogue fusion off avoids slow fused epilogues on some shapes.
INDUCTOR_FLAGS = dict(conv_1x1_as_mm=True, coordinate_descent_tuning=True,
                      coordinate_descent_check_all_directions=True, epilogue_fusion=False, shape_padding=True)


def apply_inductor_flags(flags: dict = INDUCTOR_FLAGS) -> None:
    import torch._inductor.config as ic

    for k, v in flags.items():
        setattr(ic, k, v)


class Compile(Optimization):
    name, flag, load_time = "compile", "use_compile", True
    toggle = True  # eager modules are kept: a request may opt out

    def __init__(self, mode: str = "default", inductor_flags: bool = True, compile_vae: bool = True):
        self.mode = mode
        self.inductor_flags = inductor_flags
        self.compile_vae = compile_vae

    def prepare(self, service) -> str:
        if self.inductor_flags:
            apply_inductor_flags()
        # Static shapes: one specialised graph per resolution (the fastest kernels); a server sees few sizes.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for key, module in list(service.transformer_variants.items()):
            precision, compiled = key
            if not compiled:
                service.transformer_variants[(precision, True)] = torch.compile(
                    module, mode=self.mode, fullgraph=True, dynamic=False)
        if self.compile_vae:
            service.vae_decode_compiled = torch.compile(service.vae_decode_eager, mode=self.mode, dynamic=False)
        return f"torch.compile mode={self.mode}, fullgraph, static shapes; inductor flags " + \
            ("on" if self.inductor_flags else "off") + ("; VAE decode compiled" if self.compile_vae else "")
