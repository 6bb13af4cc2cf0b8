"""The pipeline calls the first-block cache tests run (eager and inside graphs): text-to-image, edit, true CFG."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

STEPS = 8


def gen_kwargs(**extra):
    kw = dict(prompt="a red car", height=256, width=256, max_area=256 * 256, num_inference_steps=STEPS,
              guidance_scale=2.5, generator=torch.Generator().manual_seed(0), output_type="latent")
    kw.update(extra)
    return kw


def edit_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8))


CASES = {
    "generate": lambda: gen_kwargs(),
    "edit": lambda: gen_kwargs(image=edit_image(), _auto_resize=False),
    "cfg": lambda: gen_kwargs(true_cfg_scale=2.0, negative_prompt="blurry"),
}
CALLS = {"generate": STEPS, "edit": STEPS, "cfg": 2 * STEPS}
