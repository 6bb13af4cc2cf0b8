"""The per-step hook of a generation: `StepEvent`, and the probe that lets a step's event decode a preview.

What: `Runner.generate(on_step=...)` calls `on_step(StepEvent)` on the worker thread after every denoising step.
`StepEvent.preview()` decodes that step's prediction of the clean image, lazily: flow matching predicts the velocity
v, so x0 = x_t - sigma_t * v, from the step's transformer call (the positive branch under true CFG), unpacked with
the pipeline's own `_unpack_latents` and decoded with the run's VAE decode.
Why: streamed partial images (the OpenAI routes) and per-step progress of jobs use the same one hook.
Contract: the hook runs on the worker thread between two steps, so it must be quick and must not block: it hands
its work to another thread. `preview()` is valid only while the hook runs (the next step replaces what it reads);
afterwards, or where no prediction is known, it returns None, as it does when decoding fails (logged). An exception
raised by the hook itself ends the generation like any other failure.
Cost: one VAE decode per preview, at the output size: the same shape as the final decode, so a compiled or
captured decoder is reused and nothing new is compiled or captured on the request's time (a smaller preview would be
a new shape for them). It is timed as the request's `preview` stage, outside the other stages.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger("flux.service")


@dataclass(frozen=True)
class StepEvent:
    step: int  # denoising steps done, 1..steps
    steps: int  # steps this generation runs
    preview: Callable[[], Any]  # () -> PIL image of the predicted clean image (the first of a batch), or None


def preview_steps(steps: int, partial_images: int) -> list[int]:
    """The steps (1-based) whose previews are sent: `partial_images` evenly spaced before the last step."""
    if partial_images <= 0 or steps <= 1:
        return []
    picks = {min(steps - 1, max(1, round(steps * (i + 1) / (partial_images + 1)))) for i in range(partial_images)}
    return sorted(picks)


def _first(output):
    """The tensor a transformer call returned (a tuple with return_dict=False, or an output object)."""
    if isinstance(output, (tuple, list)):
        return output[0]
    return getattr(output, "sample", output)


class StepProbe:
    """Records each step's first transformer call (x_t, v) and makes the step's event.

    `observe` is the timed transformer's after-call hook; `step_done` is called from the pipeline's step-end callback
    with the number of latent tokens of the output (an edit's reference tokens follow them in x_t and v)."""

    def __init__(self, pipe, run, width: int, height: int, timer):
        self.pipe, self.run, self.width, self.height, self.timer = pipe, run, width, height, timer
        self._x_t = self._v = self._timestep = None
        self._generation = 0  # bumped after each step: a stale event's preview() returns None

    def observe(self, kwargs: dict, output) -> None:
        if self._v is None:  # the step's first call: the positive prompt's branch under true CFG
            self._x_t, self._timestep, self._v = kwargs.get("hidden_states"), kwargs.get("timestep"), _first(output)

    def step_done(self, step: int, steps: int, n_latent: int, on_step: Callable[[StepEvent], None]) -> None:
        generation = self._generation
        sigma = self._sigma()
        x_t, v = self._x_t, self._v

        def preview():
            if generation != self._generation or x_t is None or v is None or sigma is None:
                return None
            try:
                return self._decode(x_t, v, sigma, n_latent)
            except Exception:  # noqa: BLE001 - a preview is best effort; the generation goes on
                log.warning("step %d: the preview could not be decoded", step, exc_info=True)
                return None

        try:
            on_step(StepEvent(step=step, steps=steps, preview=preview))
        finally:
            self._generation += 1
            self._x_t = self._v = self._timestep = None

    def _sigma(self) -> torch.Tensor | None:
        """The step's sigma: the scheduler's own (its step index has moved past it), else the transformer's
        timestep input (t / 1000, which both schedulers' flow sigmas equal)."""
        sched = self.pipe.scheduler
        index = getattr(sched, "step_index", None)
        sigmas = getattr(sched, "sigmas", None)
        if index is not None and sigmas is not None and 0 < index <= len(sigmas):
            return sigmas[index - 1].to(torch.float32)
        if self._timestep is not None:
            return self._timestep.to(torch.float32).reshape(-1)[:1]
        return None

    @torch.inference_mode()
    def _decode(self, x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, n_latent: int):
        self.timer.start("preview")
        try:
            x_t, v = x_t[:1, :n_latent], v[:1, :n_latent]  # the first image; no reference-image tokens
            x0 = (x_t.to(torch.float32) - sigma.to(x_t.device) * v.to(torch.float32)).to(x_t.dtype)
            pipe = self.pipe
            latents = pipe._unpack_latents(x0, self.height, self.width, pipe.vae_scale_factor)
            config = pipe.vae.config
            latents = latents / config.scaling_factor + config.shift_factor
            image = self.run.vae_decode(latents, return_dict=False)[0]
            return pipe.image_processor.postprocess(image, output_type="pil")[0]
        finally:
            self.timer.stop("preview")
