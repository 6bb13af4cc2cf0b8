"""The optimisation contract, run over every registry entry (CPU, tiny): an entry that cannot run here says why,
everywhere that reason is reported; one that can leaves nothing behind after a request; a lossless one matches the
exact output. New registry entries are covered by adding nothing: the list comes from the registry."""
from __future__ import annotations

import pytest
import torch

from kontext_server.request import FLAG_TO_OPTIMIZATION, InferenceRequest
from kontext_server.service import FluxService, ServiceConfig, StrictError
from optimizations.base import DeviceInfo
from optimizations.compile import Compile
from optimizations.registry import STACK_ORDER, build_registry

CPU = DeviceInfo("cpu", "cpu", None)
REQUEST = dict(prompt="a red car", width=256, height=256, steps=2, seed=11)
FLAG = {opt: flag for flag, opt in FLAG_TO_OPTIMIZATION.items()}
AVAILABLE = [n for n, o in build_registry().items() if o.available(CPU) is None]
UNAVAILABLE = [n for n in STACK_ORDER if n not in AVAILABLE]


def _service(cache_dir, names: str) -> FluxService:
    svc = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations=names, cache_dir=cache_dir,
                                    compile_vae=False))
    svc.load()
    return svc


@pytest.fixture(scope="module")
def baseline(cache_dir):
    return _service(cache_dir, "none")


@pytest.fixture
def cheap_compile(monkeypatch):
    """dynamo with its eager backend: the same in-place regional compile, guards and stances, without inductor's
    code generation (which would make this contract test a minute per entry on two CPU cores)."""
    original = Compile._kwargs
    monkeypatch.setattr(Compile, "_kwargs", lambda self: {**original(self), "backend": "eager"})
    monkeypatch.setattr(Compile, "aot_unavailable", lambda self, components: "contract test: dynamo in place")
    yield
    torch._dynamo.reset()


def _run(svc, **flags):
    return svc.generate(InferenceRequest(**REQUEST, **flags), output_type="latent")


def _pipeline_state(svc) -> dict:
    """What a request must leave as it found it: the pipeline's components and their instance attributes."""
    pipe = svc.pipe
    return {"components": {name: pipe.__dict__.get(name) for name in pipe.components},  # the objects themselves
            "instance_forwards": {name: getattr(pipe, name).__dict__.get("forward")
                                  for name in ("transformer", "vae", "text_encoder", "text_encoder_2")},
            "stance": getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", None),
            "grad": torch.is_grad_enabled()}


def test_every_entry_is_listed_once():
    assert sorted(AVAILABLE + UNAVAILABLE) == sorted(STACK_ORDER) and set(FLAG) == set(STACK_ORDER)


@pytest.mark.parametrize("name", UNAVAILABLE)
def test_an_entry_that_cannot_run_says_why_in_prepare_plan_and_strict(baseline, name):
    reason = baseline.registry[name].available(CPU)
    assert isinstance(reason, str) and reason.strip()
    with pytest.raises(ValueError, match="cannot prepare"):
        baseline.prepare([name])
    plan = baseline.plan(InferenceRequest(**REQUEST, **{FLAG[name]: True}))
    assert plan[name].requested and not plan[name].applied and plan[name].detail == reason
    with pytest.raises(StrictError) as exc:
        baseline.plan(InferenceRequest(**REQUEST, **{FLAG[name]: True}, strict=True))
    assert (FLAG[name], reason) in exc.value.problems


@pytest.mark.parametrize("name", AVAILABLE)
def test_an_entry_leaves_nothing_behind_after_a_request(cache_dir, baseline, cheap_compile, name):
    svc = _service(cache_dir, name)
    before = _pipeline_state(svc)
    first = _run(svc, **{FLAG[name]: True})
    assert first.optimizations[name].applied
    assert _pipeline_state(svc) == before
    if svc.registry[name].toggle:  # a request without it, after one with it, is what a fresh one without it is
        after = _run(svc, **{FLAG[name]: False})
        assert not after.optimizations[name].applied
        torch.testing.assert_close(after.latents, _run(baseline).latents, rtol=0, atol=0)
    again = _run(svc, **{FLAG[name]: True})  # and the entry itself carries nothing from one request to the next
    torch.testing.assert_close(again.latents, first.latents, rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in AVAILABLE if not build_registry()[n].lossy])
def test_a_lossless_entry_matches_the_exact_output(cache_dir, baseline, cheap_compile, name):
    svc = _service(cache_dir, name)
    out = _run(svc, **{FLAG[name]: True})
    ref = _run(baseline)
    assert out.optimizations[name].applied and not ref.optimizations[name].applied
    # float reordering only (a fused GEMM, a batched modulation GEMM): far below any visible difference
    torch.testing.assert_close(out.latents, ref.latents, rtol=1e-5, atol=1e-5)
