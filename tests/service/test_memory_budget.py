"""`--memory-budget` on a CPU with the tiny model: the tier is placed with diffusers' offload hooks (onload device cpu,
no streams: diffusers allows none on a CPU) and the service makes the same image as without a budget; /health and
the response report the tier; a bad or too small budget stops the start with the setting named; an out-of-memory
request under a budget is a 503 and the next one is served; without a budget nothing is placed or hooked.

The tiny model's sizes are far too small for any real budget to offload anything (and with three blocks, streaming
it would hold as much as keeping it), so the budgeted services plan with the full model's sizes (memory_sizes.measure
on a meta-device build of the real configs, the same numbers tools/memory_tiers.py --plan prints): the tiny modules
are then placed exactly as the full ones would be at that budget. Same image means equal pixels: on a CPU the hooks
move nothing, and every request here is at most 256 px a side, where no tiling applies.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_server.request import InferenceRequest
from tests.helpers import png_b64

OPTS = "qkv_fusion,channels_last,modulation_table,first_block_cache,dpm_solver"
BUDGET = "10GB"  # with the full model's sizes and no fp8 (a CPU): the exact transformer and T5 offloaded


def _full_sizes(monkeypatch) -> None:
    from kontext_server.service import memory_sizes

    measure = memory_sizes.measure
    monkeypatch.setattr(memory_sizes, "measure", lambda pipe, fp8, warmup_sizes=(): measure(
        memory_sizes.meta_pipeline(), fp8, warmup_sizes))


def _service(cache_dir, budget=None, **kw):
    from kontext_server.service import FluxService, ServiceConfig

    svc = FluxService(ServiceConfig(model="tiny", device="cpu", cache_dir=cache_dir, optimizations=OPTS,
                                    memory_budget=budget, **kw))
    svc.load()
    return svc


@pytest.fixture(scope="module")
def plain(cache_dir):
    return _service(cache_dir)


@pytest.fixture(scope="module")
def budgeted(cache_dir):
    with pytest.MonkeyPatch.context() as mp:
        _full_sizes(mp)
        return _service(cache_dir, BUDGET)


def _hooked(module: torch.nn.Module) -> list[str]:
    """The submodules diffusers' group offloading put a hook on."""
    return [name for name, m in module.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook("group_offloading")]


def _image(size=256):
    return Image.new("RGB", (size, size), (120, 40, 200))


@pytest.mark.parametrize("flags", [{}, {"use_dpm_solver": True}], ids=["euler", "dpm-solver"])
@pytest.mark.parametrize("edit", [False, True], ids=["text-to-image", "edit"])
def test_a_service_under_a_small_budget_makes_the_same_image_as_without_one(plain, budgeted, edit, flags):
    req = InferenceRequest(prompt="a red car", width=256, height=256, steps=3, seed=7, **flags)
    image = _image() if edit else None
    a = plain.generate(req, image, output_type="np")
    b = budgeted.generate(req, image, output_type="np")
    assert np.array_equal(a.images[0], b.images[0])
    assert b.memory_tier["transformer_offloaded"] and set(b.memory_tier["ran_offloaded"]) == {"transformer",
                                                                                             "text_encoder_2"}
    assert a.memory_tier is None


def test_the_tier_puts_diffusers_offload_hooks_on_what_it_offloads(budgeted):
    pipe = budgeted.pipe
    assert budgeted.memory_tier.offloaded().keys() == {"transformer", "text_encoder_2"}
    hooked = _hooked(pipe.transformer)
    assert "transformer_blocks.0" in hooked and "single_transformer_blocks.1" in hooked  # block level
    assert any(name.endswith(".wo") for name in _hooked(pipe.text_encoder_2))  # leaf level
    assert not _hooked(pipe.vae) and not _hooked(pipe.text_encoder)  # resident
    components = budgeted.components
    assert components.offloaded == budgeted.memory_tier.offloaded() and components.device == "cpu"
    # the offloaded transformer's modulation weights left its tree: no hook streams them per step
    from optimizations.modulation_table import ModulationLinear

    mods = [m for m in pipe.transformer.modules() if isinstance(m, ModulationLinear)]
    assert mods and all("weight" not in m._parameters for m in mods)


def test_without_a_budget_nothing_is_placed_or_hooked(plain, cache_dir):
    components = plain.components
    assert plain.memory_tier is None and "memory_tier" not in plain.health()
    assert components.device is None and components.quantise_device is None and components.offloaded == {}
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        assert not _hooked(getattr(plain.pipe, name)), name
    # and a budget that holds everything changes nothing either
    roomy = _service(cache_dir, "80GB")
    assert roomy.memory_tier.offloaded() == {} and not _hooked(roomy.pipe.transformer)
    # a prompt neither service has seen: the modulation table reuses rows of an earlier request with the same
    # conditioning, filled by a GEMM of another height (last-bit differences, modulation_table.py)
    req = InferenceRequest(prompt="a blue boat at dawn", width=256, height=256, steps=2, seed=3)
    assert np.array_equal(plain.generate(req, output_type="np").images[0],
                          roomy.generate(req, output_type="np").images[0])


@pytest.fixture(scope="module")
def client(budgeted):
    from fastapi.testclient import TestClient

    from kontext_server.api.app import ServerSettings, create_app

    app = create_app(budgeted, ServerSettings(max_queue=4, load_in_background=False))
    with TestClient(app) as c:
        yield c


def test_health_reports_the_budget_what_is_resident_what_is_offloaded_how_and_why(client):
    tier = client.get("/health").json()["memory_tier"]
    assert tier["budget"] == BUDGET and tier["budget_gib"] == 10.0
    places = tier["placements"]
    assert places["vae"]["where"] == "resident" and places["text_encoder"]["where"] == "resident"
    assert places["transformer"]["where"] == "offloaded" and "block level" in places["transformer"]["how"]
    assert places["text_encoder_2"]["where"] == "offloaded" and "leaf level" in places["text_encoder_2"]["how"]
    assert "does not fit" in places["transformer"]["why"] and "no streams" in places["transformer"]["how"]
    assert tier["applied"]["transformer"] == "group offloading, block level" and tier["applied"]["streams"] is False
    assert tier["design_request"] == "a 1024x1024 edit (8,704 tokens)" and tier["vae"]["tiled"] is False


def test_the_response_says_the_request_ran_offloaded(client):
    r = client.post("/inference", json={"prompt": "a red car", "width": 256, "height": 256, "steps": 2, "seed": 1,
                                        "image": png_b64()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["memory_tier"]["transformer"] == "transformer" and body["memory_tier"]["transformer_offloaded"]
    assert any(w.startswith("ran offloaded: the exact transformer") for w in body["warnings"])
    assert body["optimizations"]["qkv_fusion"]["applied"]  # what can run offloaded still does
    cached = client.post("/inference", json={"prompt": "a red car", "width": 256, "height": 256, "steps": 2,
                                             "use_first_block_cache": True}).json()
    assert not cached["optimizations"]["first_block_cache"]["applied"]
    assert "offloaded under --memory-budget" in cached["optimizations"]["first_block_cache"]["detail"]


def test_a_request_that_runs_out_of_memory_under_a_budget_is_a_503_and_the_next_is_served(client, budgeted,
                                                                                          monkeypatch):
    attn = budgeted.pipe.transformer.single_transformer_blocks[1].attn  # inside a block its hook brought in
    calls = []

    def out_of_memory(*args, **kwargs):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(attn, "forward", out_of_memory)
    body = {"prompt": "a red car", "width": 256, "height": 256, "steps": 2, "seed": 1}
    r = client.post("/inference", json=body)
    assert r.status_code == 503 and r.json()["error"] == "out_of_memory" and calls
    monkeypatch.undo()
    assert client.post("/inference", json=body).status_code == 200
    assert client.get("/health").status_code == 200


def test_a_bad_memory_budget_stops_the_start_with_an_error_naming_the_setting(monkeypatch, capsys):
    from kontext_server import cli
    from kontext_server.service import ServiceConfig

    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["serve", "--memory-budget", "lots"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--memory-budget" in err and "FLUX_MEMORY_BUDGET" in err and "24GB" in err and "'lots'" in err
    monkeypatch.setenv("FLUX_MEMORY_BUDGET", "24 parsecs")
    with pytest.raises(SystemExit):
        cli.config_from_env()
    assert "FLUX_MEMORY_BUDGET" in capsys.readouterr().err
    monkeypatch.setenv("FLUX_MEMORY_BUDGET", "16GB")
    assert cli.config_from_env()[0].memory_budget == "16GB"
    with pytest.raises(ValueError, match="FLUX_MEMORY_BUDGET"):
        ServiceConfig(memory_budget="lots")
    with pytest.raises(ValueError, match="--context-parallel"):
        ServiceConfig(memory_budget="24GB", context_parallel=2)


def test_a_budget_too_small_for_the_model_stops_the_start_with_the_minimum_it_needs(cache_dir, monkeypatch):
    from kontext_server.models import ModelLoadError

    _full_sizes(monkeypatch)
    with pytest.raises(ModelLoadError, match=r"--memory-budget \(FLUX_MEMORY_BUDGET\) 1GB .* too small .* needs"):
        _service(cache_dir, "1GB")


def test_auto_on_a_cpu_budgets_nothing_and_says_so(cache_dir):
    svc = _service(cache_dir, "auto", warmup_sizes=[])
    assert svc.memory_tier is None and svc.components.offloaded == {}
    assert svc.health()["memory_tier"] == {"budget": "auto", "note": svc.memory_tier_note}
