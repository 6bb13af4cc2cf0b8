"""channels-last memory format for the VAE (its convolutions run faster in NHWC on tensor cores).

The transformer has no convolutions (it works on token sequences), so channels-last does not apply to it;
we say so rather than pretend. Load-time and always on once prepared.
"""
from __future__ import annotations

import torch

from optimizations.base import Components, Optimization


class ChannelsLast(Optimization):
    name, flag, load_time = "channels_last", "use_channels_last", True
    toggle = False

    def prepare(self, components: Components) -> str:
        components.pipe.vae.to(memory_format=torch.channels_last)
        return "VAE in channels-last (the transformer has no convolutions: not applicable there)"
