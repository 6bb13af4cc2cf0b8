"""The per-step hook (kontext_server/service/steps.py): one event per denoising step, and previews decoded from the
predicted clean latents x0 = x_t - sigma_t * v. At the last step that prediction is exactly what Euler's (and
DPM-Solver++'s first-order) final step lands on, so the last preview must be the final image: that ties the formula,
the positive branch, the unpacking and the decode to the pipeline's own output."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kontext_server.request import InferenceRequest

BASE = dict(prompt="a red car", width=256, height=256, steps=3, seed=5)


def run(svc, image=None, **extra):
    events = []

    def hook(ev):
        events.append((ev.step, ev.steps, ev.preview(), ev))

    result = svc.generate(InferenceRequest(**BASE, **extra), image, on_step=hook)
    return result, events


def pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(int)


@pytest.mark.parametrize("edit, extra", [(False, {}), (True, {}), (False, {"use_dpm_solver": True})],
                         ids=["text-to-image", "edit", "dpm-solver"])
def test_the_last_steps_preview_is_the_final_image(tiny_service, edit, extra):
    image = Image.new("RGB", (256, 256), (200, 30, 30)) if edit else None
    result, events = run(tiny_service, image, **extra)
    assert [(s, n) for s, n, *_ in events] == [(1, 3), (2, 3), (3, 3)]
    assert all(p is not None and p.size == (256, 256) for _, _, p, _ in events)
    assert np.array_equal(pixels(events[-1][2]), pixels(result.images[0]))
    assert np.abs(pixels(events[0][2]) - pixels(result.images[0])).max() > 0  # an early preview is not the final


def test_previews_are_timed_as_their_own_stage_and_not_as_glue(tiny_service):
    result, events = run(tiny_service)
    t = result.timings_ms
    assert t["preview"] > 0
    stages = t["text_encode"] + t["image_encode"] + t["transformer"] + t["vae_decode"] + t["preview"]
    assert stages + t["glue"] == pytest.approx(t["total"], abs=0.05)
    plain = tiny_service.generate(InferenceRequest(**BASE))
    assert "preview" not in plain.timings_ms


def test_a_hook_that_asks_for_no_preview_costs_no_decode(tiny_service):
    steps = []
    result = tiny_service.generate(InferenceRequest(**BASE), on_step=lambda ev: steps.append(ev.step))
    assert steps == [1, 2, 3] and "preview" not in result.timings_ms


def test_a_preview_asked_for_after_its_step_is_none(tiny_service):
    kept = []
    tiny_service.generate(InferenceRequest(**BASE), on_step=kept.append)
    assert [ev.preview() for ev in kept] == [None, None, None]


def test_under_true_cfg_the_preview_comes_from_the_positive_branch(tiny_service):
    """The guided velocity is not the positive branch's, so the last preview is close to, not equal to, the final
    image; it is still a full-size image of the same scene."""
    result, events = run(tiny_service, true_cfg_scale=2.0, negative_prompt="blurry")
    last, final = pixels(events[-1][2]), pixels(result.images[0])
    assert last.shape == final.shape
    assert 0 < np.abs(last - final).mean() < np.abs(pixels(events[0][2]) - final).mean()


def test_a_hook_that_raises_ends_the_generation(tiny_service):
    def hook(ev):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        tiny_service.generate(InferenceRequest(**BASE), on_step=hook)
    assert tiny_service.generate(InferenceRequest(**BASE)).images  # the next request runs normally
