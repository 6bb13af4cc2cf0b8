"""Fixtures of the loading tests: the saved tiny pipeline, its transformer as a BFL single file, and a reference
image and latents from the diffusers directory."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tests.models.bfl_files import to_bfl


@dataclass
class Output:
    image: np.ndarray
    latents: torch.Tensor


def generate(pipe) -> Output:
    """A 2-step text-to-image at 128x128, seed 0: the image and the latents."""
    kw = dict(prompt="make the car red", height=128, width=128, max_area=128 * 128, num_inference_steps=2,
              guidance_scale=2.5)
    with torch.inference_mode():
        image = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="np").images
        latents = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="latent").images
    return Output(image=np.asarray(image), latents=latents.float())


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.fixture(scope="session")
def tiny_dir(cache_dir):
    from kontext_server.models import tiny

    return tiny.ensure_tiny_saved(cache_dir)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_dir):
    """The tiny pipeline loaded from its diffusers directory through the server's entry."""
    from kontext_server.models import sources

    return sources.load_model(str(tiny_dir), "cpu")


@pytest.fixture(scope="session")
def reference(tiny_loaded) -> Output:
    return generate(tiny_loaded.pipe)


@pytest.fixture(scope="session")
def tiny_bfl(tiny_loaded) -> dict[str, torch.Tensor]:
    """The tiny transformer's state dict in BFL's layout (fp32, as the directory stores it)."""
    return to_bfl({k: v.detach().clone() for k, v in tiny_loaded.pipe.transformer.state_dict().items()})


@pytest.fixture(scope="session")
def bfl_file(tiny_bfl, tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("single-file") / "flux1-kontext-tiny.safetensors"
    save_file(tiny_bfl, str(path))
    return path
