"""Fidelity of a lossy option against the exact output with the same seed: PSNR of the image, max-abs and relative
latent difference, and (StepProbe) the relative error of one transformer step on identical inputs, free of the drift
that many steps of a random-weight model amplify."""
from __future__ import annotations

import math

import numpy as np
import torch


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB for images in [0, 1]; None when identical (infinite PSNR is not valid JSON)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else round(10 * math.log10(1.0 / mse), 2)


def fidelity(ref, out) -> dict:
    if ref is None:
        return {}
    img_a, img_b = np.asarray(ref.images[0]), np.asarray(out.images[0])
    value = psnr(img_a, img_b)
    fid = {"identical_image": True} if value is None else {"psnr_db": value}
    if ref.latents is not None and out.latents is not None:
        la, lb = ref.latents.float(), out.latents.float()
        fid["max_abs_latent_diff"] = round(float((la - lb).abs().max()), 5)
        fid["rel_latent_error"] = round(float((la - lb).norm() / la.norm().clamp_min(1e-12)), 5)
    return fid


class StepProbe:
    """Per-step fidelity: the real inputs of one mid-denoising transformer call of stage 0, and stage 0's output
    on them. Each later stage runs its own transformer on the same inputs: the relative error of one step,
    free of the drift that 28 steps of a random-weight model amplify."""

    def __init__(self, call_index: int = 3):
        self.call_index, self.calls, self.inputs, self.ref = call_index, 0, None, None

    def observe(self, kwargs):
        if self.calls == self.call_index and self.inputs is None:
            self.inputs = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        self.calls += 1

    def rel_error(self, module) -> float | None:
        if self.inputs is None:
            return None
        with torch.inference_mode():
            out = module(**self.inputs)[0].float()
        if self.ref is None:
            self.ref = out
            return 0.0
        return round(float((out - self.ref).norm() / self.ref.norm()), 5)
