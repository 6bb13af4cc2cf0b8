"""The modulation table (optimizations/modulation_table.py) on the tiny model: same outputs as the per-step linears,
every call finds its row (CFG, several images, DPM-Solver++, step counts past the table's capacity), a call that
finds no row fails the request, and compiled blocks keep sharing one graph per block kind."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.helpers import transformer_inputs
from optimizations import modulation_table as mt
from kontext_server.request import InferenceRequest
from kontext_server.service import FluxService, ServiceConfig


@pytest.fixture(scope="module")
def services(cache_dir):
    """Two tiny services on the same weights: per-step linears, and the modulation table."""
    out = {}
    for name, opts in (("plain", "dpm_solver,first_block_cache"),
                       ("table", "modulation_table,dpm_solver,first_block_cache")):
        svc = FluxService(ServiceConfig(model="tiny", device="cpu", cache_dir=cache_dir, optimizations=opts))
        svc.load()
        out[name] = svc
    return out


def _latents(svc, **fields):
    req = InferenceRequest(prompt="a red car", width=256, height=256, seed=7, **fields)
    res = svc.generate(req, output_type="np")
    return np.asarray(res.latents.float()), res


@pytest.mark.parametrize("fields", [
    dict(steps=4),
    dict(steps=3, true_cfg_scale=2.0, negative_prompt="blurry"),  # two conditionings per step
    dict(steps=2, num_images=2),
    dict(steps=5, use_dpm_solver=True),
    dict(steps=40),  # 41 rows > half the 64-row table: refilled in chunks
    dict(steps=35, true_cfg_scale=2.0, negative_prompt="blurry"),  # both conditionings refill, evicting each other
])
def test_same_result_as_per_step_linears(services, fields):
    ref, _ = _latents(services["plain"], **fields)
    out, res = _latents(services["table"], **fields)
    assert res.optimizations["modulation_table"].applied
    assert not services["plain"].plan(InferenceRequest(prompt="x"))["modulation_table"].applied
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)  # float32 tiny model: batched GEMM reordering only
    assert int(services["table"].registry["modulation_table"].state.misses) == 0


def test_rows_are_written_once_per_request_not_per_step(services):
    state = services["table"].registry["modulation_table"].state
    before = state.fills
    _latents(services["table"], steps=6)
    assert state.fills - before == 1  # one batched fill served all 6 steps


def test_table_really_replaces_the_linears(services):
    """Poisoning the table changes the output: the blocks read it instead of running their linears."""
    svc = services["table"]
    state = svc.registry["modulation_table"].state
    ref, _ = _latents(svc, steps=2)
    transformer = svc.transformer_variants["exact"]
    kwargs = transformer_inputs(transformer, n_img=16, n_txt=8, device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        good = transformer(**kwargs)[0]
        state.table.mul_(1.5)  # rows of this (cached) conditioning now wrong
        bad = transformer(**kwargs)[0]
        state.reset()
    assert not torch.allclose(good, bad)
    np.testing.assert_allclose(_latents(svc, steps=2)[0], ref, rtol=1e-5, atol=1e-6)  # refilled after the reset


def test_a_call_without_a_row_fails_the_request_instead_of_returning_a_wrong_image(services):
    svc = services["table"]
    opt = svc.registry["modulation_table"]
    transformer = svc.transformer_variants["exact"]
    kwargs = transformer_inputs(transformer, n_img=16, n_txt=8, device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        transformer(**kwargs)  # first call of this conditioning: its rows are written
        kwargs["timestep"] = torch.full((1,), 0.123)  # same conditioning tensors, a timestep no row has
        transformer(**kwargs)
    with pytest.raises(RuntimeError, match="matched no table row"):
        with opt.activate(None):
            pass
    assert int(opt.state.misses) == 0  # reset, so the next request is judged on its own
    _latents(svc, steps=2)  # and the service still works


def test_deepcopy_shares_the_table(services):
    """The fp8 variant is a deep copy of the bf16 transformer: its lookups must read the same table."""
    transformer = services["table"].transformer_variants["exact"]
    state = getattr(transformer, mt.STATE_ATTR)
    twin = copy.deepcopy(transformer)
    assert getattr(twin, mt.STATE_ATTR) is state
    lin = twin.transformer_blocks[0].norm1.linear
    assert isinstance(lin, mt.ModulationLinear) and lin.state is state
    assert lin.rows.data_ptr() == transformer.transformer_blocks[0].norm1.linear.rows.data_ptr()
    assert lin.weight is not transformer.transformer_blocks[0].norm1.linear.weight  # weights are copied as usual
    kwargs = transformer_inputs(transformer, n_img=16, n_txt=8, device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        torch.testing.assert_close(twin(**kwargs)[0], transformer(**kwargs)[0])


def _unique_graphs(transformer, with_table: bool):
    from torch._dynamo.utils import counters

    if with_table:
        mt.install(transformer)
    torch._dynamo.reset()
    counters.clear()
    transformer.compile_repeated_blocks(backend="eager", fullgraph=True, dynamic=False)
    with torch.inference_mode():
        for seed in (0, 1):
            out = transformer(**transformer_inputs(transformer, n_img=16, n_txt=8, seed=seed, device="cpu",
                                                   dtype=torch.float32))[0]
    n = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return n, out


def test_compiled_blocks_share_one_graph_per_block_kind():
    """Each block reads its own view of the table: a per-block integer offset would make dynamo specialise (and
    recompile) every one of the 57 blocks. Three blocks of each kind, compiled regionally, with and without."""
    from diffusers import FluxTransformer2DModel

    def model():
        torch.manual_seed(0)
        return FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=3,
                                      num_single_layers=3, attention_head_dim=8, num_attention_heads=2,
                                      joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                                      axes_dims_rope=(2, 2, 4)).eval()

    plain, ref = _unique_graphs(model(), with_table=False)
    table, out = _unique_graphs(model(), with_table=True)
    assert table == plain < 6, (plain, table)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_not_available_with_full_graph_compile():
    from optimizations.base import DeviceInfo
    from optimizations.registry import build_registry

    reg = build_registry(compile_scope="full")
    assert "full-graph" in reg["modulation_table"].available(DeviceInfo("cuda", "H100", (9, 0)))
    assert build_registry()["modulation_table"].available(DeviceInfo("cpu", "cpu", None)) is None
