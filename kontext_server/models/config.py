"""The real FLUX.1-Kontext-dev component configs (configs/flux-kontext-dev.json): used to build `synthetic-full` at
full size, and for the tiny model's VAE scaling and scheduler."""
from __future__ import annotations

import json
from pathlib import Path

FULL_CONFIG_PATH = Path(__file__).parent / "configs" / "flux-kontext-dev.json"


def full_configs() -> dict[str, dict]:
    """The real model's config per component (configs/flux-kontext-dev.json), without the `_` keys (notes,
    diffusers' class names) at either level."""
    return {name: {k: v for k, v in cfg.items() if not k.startswith("_")}
            for name, cfg in json.loads(FULL_CONFIG_PATH.read_text()).items() if not name.startswith("_")}
