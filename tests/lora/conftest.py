"""LoRA test fixtures: adapters made with PEFT on the tiny transformer (random non-zero weights), saved in diffusers'
layout and in kohya's, a library directory with good and bad files, and the services the tests compare."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.lora.adapters import make_library


@pytest.fixture(scope="session")
def lora_source(cache_dir, tmp_path_factory) -> Path:
    """Every adapter file the tests use (good and bad), made once."""
    return make_library(cache_dir, tmp_path_factory.mktemp("lora-source"))


@pytest.fixture(scope="module")
def lora_dir(lora_source, tmp_path_factory) -> Path:
    """A library directory of its own per test module (tests add files to it)."""
    d = tmp_path_factory.mktemp("lora-dir")
    for p in lora_source.glob("*.safetensors"):
        if not p.name.startswith("later_"):
            shutil.copy(p, d / p.name)
    return d


def make_service(cache_dir, optimizations: str = "qkv_fusion,modulation_table", device: str = "cpu",
                 fused: bool = True, **config):
    """A tiny service; `fused`: the adapters' rows appended under the weights (FLUX_LORA_FUSED_BRANCH=1, the default:
    it takes the side branch's place on every module it can), else the side branch (FLUX_LORA_FUSED_BRANCH=0)."""
    from kontext_server.service import FluxService, ServiceConfig

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLUX_LORA_FUSED_BRANCH", "1" if fused else "0")
        svc = FluxService(ServiceConfig(model="tiny", device=device, cache_dir=cache_dir, optimizations=optimizations,
                                        compile_vae=False, **config))
        svc.load()
    return svc


@pytest.fixture(scope="module")
def lora_service(cache_dir, lora_dir):
    """QKV fusion and the modulation table prepared (the fused and table paths), adapters from lora_dir, rank 8."""
    return make_service(cache_dir, lora_dir=lora_dir, lora_max_rank=8)


@pytest.fixture(scope="module")
def base_service(cache_dir):
    """The same optimisations, no LoRA directory: what a fresh server without adapters computes."""
    return make_service(cache_dir)


def latents(svc, loras=(), **overrides):
    from kontext_server.request import InferenceRequest

    req = InferenceRequest(**{**REQUEST, **overrides}, loras=[{"name": n, "scale": s} for n, s in loras])
    return svc.generate(req, output_type="latent")


REQUEST = dict(prompt="a red car", width=256, height=256, steps=2, seed=7)


@pytest.fixture(autouse=True)
def _no_grad_leak():
    yield
    assert torch.is_grad_enabled()
