"""Helpers the tests share (fixtures live in conftest.py): test images, transformer inputs, a live server process."""
from __future__ import annotations

import base64
import io
import tempfile
from pathlib import Path

import torch
from PIL import Image

from load_test import ServerProcess, free_port  # tools/ (pytest.ini's pythonpath)

ROOT = Path(__file__).resolve().parents[1]
__all__ = ["ROOT", "LiveServer", "decode_b64_image", "free_port", "png_b64", "transformer_inputs"]


def png_b64(width: int = 256, height: int = 256, color=(200, 30, 30), fmt: str = "PNG") -> str:
    img = Image.new("RGB", (width, height), color)
    for x in range(0, width, 8):  # some structure, so encoders see more than a flat colour
        img.putpixel((x, (x * 7) % height), (0, 0, 255))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def decode_b64_image(s: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(s)))
    img.load()
    return img


def transformer_inputs(transformer, n_img: int = 1024, n_txt: int = 512, seed: int = 0, device: str = "cuda",
                       dtype: torch.dtype = torch.bfloat16) -> dict:
    """Keyword arguments for one FluxTransformer2DModel call: random latents and text for a square image of n_img
    tokens, its position ids, timestep 0.7 and (when the model has it) guidance 2.5."""
    g = torch.Generator(device).manual_seed(seed)
    side = int(n_img**0.5)
    ids = torch.zeros(side, side, 3, device=device)
    ids[..., 1] = torch.arange(side, device=device)[:, None]
    ids[..., 2] = torch.arange(side, device=device)[None, :]
    cfg = transformer.config
    return dict(hidden_states=torch.randn(1, n_img, cfg.in_channels, generator=g, device=device, dtype=dtype),
                encoder_hidden_states=torch.randn(1, n_txt, cfg.joint_attention_dim, generator=g, device=device,
                                                  dtype=dtype),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g, device=device, dtype=dtype),
                timestep=torch.full((1,), 0.7, device=device, dtype=dtype), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(n_txt, 3, device=device),
                guidance=torch.full((1,), 2.5, device=device) if cfg.guidance_embeds else None, return_dict=False)


class LiveServer(ServerProcess):
    """`python flux_kontext_optimized.py serve --model tiny ...` in a subprocess on loopback (the load-test tool's
    server), with its cache and log in the test session's cache directory."""

    def __init__(self, cache_dir: Path, *extra: str, env: dict | None = None):
        # no drain period unless a test asks for one: every module's teardown would wait for it.
        # Each server its own data directory unless the test gives one (one server per data directory).
        data = [] if "--data-dir" in extra else ["--data-dir", tempfile.mkdtemp(prefix="flux-test-data-")]
        super().__init__(extra=["--drain-seconds", "0", *data, *extra], cache_dir=str(cache_dir), env=env)
