"""The service's LoRA life cycle (CPU, tiny): no recompile when switching adapters under compile, the fused adapter,
the LRU store and its timed loads, preloading, and compiled regions left to dynamo while slots exist."""
from __future__ import annotations

import pytest
import torch

from kontext_server.lora.library import AdapterFused
from kontext_server.lora.slots import LoraGeluOutput, LoraProjOut
from kontext_server.request import InferenceRequest
from optimizations.compile import Compile
from tests.lora.conftest import latents, make_service


@pytest.fixture
def counted_compile(monkeypatch):
    """The contract test's cheap compile (tests/optimizations/test_contract.py: dynamo in place, no inductor), with
    dynamo's CompileCounter as the backend: it counts every graph dynamo compiles, recompiles included."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    original = Compile._kwargs
    monkeypatch.setattr(Compile, "_kwargs", lambda self: {**original(self), "backend": counter})
    monkeypatch.setattr(Compile, "aot_unavailable", lambda self, components: "LoRA test: dynamo in place")
    torch._dynamo.reset()
    yield counter
    torch._dynamo.reset()


def test_switching_between_adapters_of_the_same_count_under_compile_does_not_recompile(cache_dir, lora_dir,
                                                                                       lora_service,
                                                                                       counted_compile):
    svc = make_service(cache_dir, "qkv_fusion,modulation_table,compile", lora_dir=lora_dir, lora_max_rank=8)
    kinds = {type(m) for m in svc.transformer_variants["exact"].modules()}
    assert {LoraGeluOutput, LoraProjOut} <= kinds  # compile's GELU epilogue and split proj_out carry slots too
    assert "saved whole" not in svc.prepared["compile"]
    latents(svc)  # no adapter: k = 0 compiles
    first = latents(svc, [("style", 1.0)])
    assert "cold_start" in first.timings_ms  # the first request with one adapter compiles (a reported warm-up)
    compiled = counted_compile.frame_count
    assert compiled > 0
    for loras in ([("light", 1.0)], [("shared", -1.0)], [("style", 0.3)], [("shared_kohya", 2.0)]):
        out = latents(svc, loras)
        assert "cold_start" not in out.timings_ms
    assert counted_compile.frame_count == compiled, "an adapter switch recompiled"
    # the compiled blocks compute what the eager ones do (the epilogue and split paths included)
    torch.testing.assert_close(latents(svc, [("style", 1.0)]).latents,
                               latents(lora_service, [("style", 1.0)]).latents, rtol=1e-4, atol=1e-4)
    # a new adapter count compiles once (so the counter does see compiles) ...
    latents(svc, [("style", 1.0), ("light", 1.0)])
    two = counted_compile.frame_count
    assert two > compiled
    latents(svc, [("shared", 1.0), ("light", -1.0)])
    latents(svc)
    latents(svc, [("light", 1.0)])
    assert counted_compile.frame_count == two  # ... and never again on a switch
    # the side branch (tools/bench_lora.py times both in one server) is other code: it compiles once, then neither
    # branch compiles again on a switch
    assert svc.lora.path == "fused"
    svc.lora.set_path("unfused")
    side = latents(svc, [("style", 1.0)])
    assert "cold_start" in side.timings_ms and counted_compile.frame_count > two
    torch.testing.assert_close(side.latents, latents(lora_service, [("style", 1.0)]).latents, rtol=1e-4, atol=1e-4)
    both = counted_compile.frame_count
    latents(svc, [("light", 1.0)])
    svc.lora.set_path("fused")
    latents(svc, [("shared", 1.0)])
    assert counted_compile.frame_count == both


@pytest.fixture(scope="module")
def fused_service(cache_dir, lora_dir):
    return make_service(cache_dir, lora_dir=lora_dir, lora_max_rank=8, lora_fuse="style:0.5")


def test_a_fused_adapter_runs_in_every_request_and_health_reports_it(fused_service, lora_service):
    torch.testing.assert_close(latents(fused_service).latents, latents(lora_service, [("style", 0.5)]).latents,
                               rtol=1e-4, atol=1e-4)
    assert fused_service.health()["lora"]["fused"] == {"name": "style", "scale": 0.5}
    with pytest.raises(AdapterFused, match="fused into the weights"):
        fused_service.check_loras(InferenceRequest(prompt="x", loras=[{"name": "style"}]))
    # other adapters still run on top of it
    assert not torch.equal(latents(fused_service, [("light", 1.0)]).latents, latents(fused_service).latents)


def test_the_store_keeps_max_loras_adapters_and_times_each_load(cache_dir, lora_dir):
    svc = make_service(cache_dir, "none", lora_dir=lora_dir, lora_max_rank=8, max_loras=1)
    assert "lora_load" in latents(svc, [("style", 1.0)]).timings_ms
    assert "lora_load" not in latents(svc, [("style", 0.5)]).timings_ms
    assert "lora_load" in latents(svc, [("light", 1.0)]).timings_ms  # style leaves: one fits
    assert list(svc.lora.store.loaded) == ["light"]
    two = latents(svc, [("style", 1.0), ("light", 1.0)])  # more than fit: the request's own stay for it
    assert two.timings_ms["lora_load"] > 0 and two.loras[0]["name"] == "style"
    health = svc.health()["lora"]
    assert health["evictions"] >= 1 and health["loads"] == 3


def test_preloaded_adapters_are_on_the_device_before_the_first_request(cache_dir, lora_dir):
    svc = make_service(cache_dir, "none", lora_dir=lora_dir, lora_max_rank=8, lora_preload=["light"])
    assert "light" in svc.health()["lora"]["loaded"]
    assert "lora_load" not in latents(svc, [("light", 1.0)]).timings_ms


def test_a_bad_preload_name_stops_the_start_up_with_its_reason(cache_dir, lora_dir):
    with pytest.raises(ValueError, match="corrupt.*cannot be read"):
        make_service(cache_dir, "none", lora_dir=lora_dir, lora_max_rank=8, lora_preload=["corrupt"])


def test_without_a_lora_directory_a_request_with_adapters_is_refused_by_name(base_service):
    from kontext_server.lora.library import UnknownAdapter

    with pytest.raises(UnknownAdapter, match="no LoRA directory") as exc:
        base_service.check_loras(InferenceRequest(prompt="x", loras=[{"name": "style"}]))
    assert exc.value.index == 0


def test_with_the_fused_branch_switched_off_no_rows_are_appended_and_the_side_branch_runs(cache_dir, lora_dir,
                                                                                          lora_service, monkeypatch):
    from kontext_server.lora.slots import LoraLinear

    svc = make_service(cache_dir, lora_dir=lora_dir, lora_max_rank=8, fused=False)
    wrappers = [m for m in svc.transformer_variants["exact"].modules() if isinstance(m, LoraLinear)]
    assert wrappers and all(w.appended is None for w in wrappers)
    assert all(w.base.weight.untyped_storage().nbytes() == w.base.weight.numel() * w.base.weight.element_size()
               for w in wrappers)  # the weights as loaded, nothing appended
    assert svc.health()["lora"]["branch"]["path"] == "unfused"
    with pytest.raises(ValueError, match="FLUX_LORA_FUSED_BRANCH=0"):
        svc.lora.set_path("fused")
    torch.testing.assert_close(latents(svc, [("style", 1.0)]).latents,
                               latents(lora_service, [("style", 1.0)]).latents, rtol=1e-5, atol=1e-5)


def test_a_request_sets_the_slots_switches_without_module_setattr_and_leaves_them_off(lora_service, monkeypatch):
    """k, fused and the table hooks' branch are set on every slot before and after each request: hundreds of slots on
    FLUX, so they are written as plain attributes (manager.set_plain), not through nn.Module.__setattr__'s checks."""
    calls = []
    original = torch.nn.Module.__setattr__

    def counting(self, name, value):
        if name in ("k", "fused", "table_branch"):
            calls.append(name)
        original(self, name, value)

    monkeypatch.setattr(torch.nn.Module, "__setattr__", counting)
    seen = {}
    with lora_service.lora.applied([InferenceRequest(prompt="x", loras=[{"name": "light", "scale": 1.0}]).loras[0]]):
        seen = {n: (s.k, s.fused) for n, s in lora_service.lora.slots.items()}
        hooks = [m.table_branch for m, _ in lora_service.lora.table_hooks]
    assert calls == []
    assert {k for k, _ in seen.values()} == {1} and all(f for _, f in seen.values())
    assert hooks and all(h is not None for h in hooks)  # light is on the modulation linears: their table hooks run it
    assert all(s.k == 0 for s in lora_service.lora.slots.values())
    assert all(m.table_branch is None for m, _ in lora_service.lora.table_hooks)
    from kontext_server.lora.manager import set_plain

    with pytest.raises(AttributeError, match="no plain attribute 'A'"):
        set_plain(next(iter(lora_service.lora.slots.values())), A=None)  # a buffer: never bypassed
