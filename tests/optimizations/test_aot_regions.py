"""Saved compiled regions (optimizations/aot_regions.py): blocks compiled whole, saved, loaded back without dynamo.

Tiny transformer on the CPU with the `aot_eager` backend (AOTAutograd without inductor: the same packaging path,
seconds instead of minutes). The service-level test with inductor in two processes is in test_optimizations.py.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
from types import SimpleNamespace

import pytest
import torch

from optimizations.compiling import aot_regions
from optimizations.base import bind_forward
from kontext_server.service import FluxService, ServiceConfig

KWARGS = dict(backend="aot_eager", fullgraph=True, dynamic=False)


@pytest.fixture(scope="module")
def transformer(cache_dir):
    svc = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations="none", cache_dir=cache_dir))
    svc.load()
    return svc.pipe.transformer


def _inputs(t, seed=0, image_tokens=64):
    g = torch.Generator().manual_seed(seed)
    c = t.config
    return dict(hidden_states=torch.randn(1, image_tokens, c.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]) if c.guidance_embeds else None,
                img_ids=torch.zeros(image_tokens, 3), txt_ids=torch.zeros(8, 3), return_dict=False)


def _install(t, directory, stats, regions=None, kwargs=KWARGS):
    from optimizations.compile import canonical_single_block_outputs

    canonical_single_block_outputs(t)  # as compile does: one single-block signature, not two
    return aot_regions.install_blocks(t, directory, "test-key", kwargs, stats, {} if regions is None else regions)


def test_blocks_compile_save_and_load_back_without_compiling(transformer, tmp_path):
    model = copy.deepcopy(transformer)
    with torch.no_grad():
        ref = model(**_inputs(model))[0]
        stats = aot_regions.Stats()
        n = _install(model, tmp_path, stats)
        assert n == len(model.transformer_blocks) + len(model.single_transformer_blocks)
        first = model(**_inputs(model))[0]
        # one package per block kind, shared by every block of that kind
        assert (stats.compiled, stats.saved, stats.loaded, stats.to_dynamo) == (2, 2, 0, 0), stats.notes
        assert len(list(tmp_path.glob("*.bin"))) == 2
        fresh = copy.deepcopy(transformer)  # as a new process would: new regions, same directory
        stats2 = aot_regions.Stats()
        _install(fresh, tmp_path, stats2)
        second = fresh(**_inputs(fresh))[0]
    assert (stats2.loaded, stats2.compiled, stats2.to_dynamo) == (2, 0, 0), stats2.notes
    torch.testing.assert_close(first, ref)
    assert torch.equal(second, first)


def test_vae_encoder_and_decoder_compile_save_and_load_back(cache_dir, tmp_path):
    """The VAE's encoder and decoder as regions (install_modules), called by diffusers' own encode / decode: same
    output as eager, one package each, loaded by fresh regions as a new process would; a contiguous copy has
    another structure (its weights' strides), so it does not reuse the channels-last one's packages. Prepared as a
    GPU server prepares the VAE (fused attention projections, channels-last; aot_eager on CPU also trips over the
    plain VAE's group norm, which inductor decomposes)."""
    svc = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations="qkv_fusion,channels_last",
                                    cache_dir=cache_dir))
    svc.load()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def run(vae):
        with torch.inference_mode():
            z = vae.encode(x).latent_dist.mode()
            return z, vae.decode(z, return_dict=False)[0]

    ref = run(svc.pipe.vae)
    vae = copy.deepcopy(svc.pipe.vae)
    stats = aot_regions.Stats()
    assert aot_regions.install_modules([vae.encoder, vae.decoder], tmp_path, "test-key", KWARGS, stats, {}) == 2
    first = run(vae)
    assert (stats.compiled, stats.saved, stats.to_dynamo) == (2, 2, 0), stats.notes
    fresh = copy.deepcopy(svc.pipe.vae)
    stats2 = aot_regions.Stats()
    aot_regions.install_modules([fresh.encoder, fresh.decoder], tmp_path, "test-key", KWARGS, stats2, {})
    second = run(fresh)
    assert (stats2.loaded, stats2.compiled, stats2.to_dynamo) == (2, 0, 0), stats2.notes
    for a, b, c in zip(ref, first, second):
        torch.testing.assert_close(b, a)
        assert torch.equal(c, b)
    nchw = copy.deepcopy(svc.pipe.vae).to(memory_format=torch.contiguous_format)
    assert aot_regions.module_structure(nchw.decoder) != aot_regions.module_structure(fresh.decoder)


def test_a_new_shape_gets_its_own_package(transformer, tmp_path):
    model = copy.deepcopy(transformer)
    stats = aot_regions.Stats()
    _install(model, tmp_path, stats)
    with torch.no_grad():
        model(**_inputs(model))
        model(**_inputs(model, seed=1))  # same shapes, other values: no new package
        assert stats.compiled == 2
        model(**_inputs(model, image_tokens=32))
    assert stats.compiled == 4 and len(list(tmp_path.glob("*.bin"))) == 4


def test_a_changed_block_moves_to_a_new_region_and_compiles_anew(transformer, tmp_path):
    """The benchmark prepares optimisations after compile; a block changed under its region must not keep running
    code compiled for what it was (the packages' identity guards are dropped, the rest checked once per block)."""
    model = copy.deepcopy(transformer)
    stats, regions = aot_regions.Stats(), {}
    _install(model, tmp_path, stats, regions)
    with torch.no_grad():
        before = model(**_inputs(model))[0]
        assert _install(model, tmp_path, stats, regions) == 0  # nothing changed: nothing re-routed
        act = model.single_transformer_blocks[0].act_mlp

        def forward(self, x):  # a rewrite that changes the result, as an optimisation's would change the code
            return torch.nn.functional.gelu(x, approximate="tanh") * 2

        for block in model.single_transformer_blocks:
            bind_forward(block.act_mlp, forward)
        assert act.forward.__func__ is forward
        assert _install(model, tmp_path, stats, regions) == len(model.single_transformer_blocks)
        after = model(**_inputs(model))[0]
        eager = copy.deepcopy(model)
        from optimizations.compile import strip_compiled

        strip_compiled(eager)
        expected = eager(**_inputs(eager))[0]
    assert stats.compiled == 3  # the double block's package stays; the single block compiled again
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, expected)


def test_regions_honour_the_compiler_stance(transformer, tmp_path):
    """--new-shapes eager runs an unwarmed shape under set_stance("force_eager"): nothing may compile on the
    request's time, as with dynamo's in-place compile; under eager_on_recompile a saved package still loads."""
    model = copy.deepcopy(transformer)
    stats = aot_regions.Stats()
    _install(model, tmp_path, stats)
    with torch.no_grad():
        with torch.compiler.set_stance("force_eager"):
            out = model(**_inputs(model))[0]
        assert stats.compiled == 0 and not list(tmp_path.glob("*.bin"))
        with torch.compiler.set_stance("eager_on_recompile"):
            model(**_inputs(model))
        assert stats.compiled == 0
        with torch.compiler.set_stance("fail_on_recompile"), pytest.raises(RuntimeError, match="fail_on_recompile"):
            model(**_inputs(model))
        model(**_inputs(model))  # default: compiles and saves
        assert stats.compiled == 2
        again = copy.deepcopy(transformer)
        stats2 = aot_regions.Stats()
        _install(again, tmp_path, stats2)
        with torch.compiler.set_stance("eager_on_recompile"):
            loaded = again(**_inputs(again))[0]
        from optimizations.compile import strip_compiled

        strip_compiled(model)
        ref = model(**_inputs(model))[0]
    assert stats2.loaded == 2 and stats2.compiled == 0
    assert torch.equal(out, ref)
    torch.testing.assert_close(loaded, ref)


def test_a_failed_aot_compile_leaves_the_shape_to_dynamo(transformer, tmp_path):
    """A plain callable backend cannot be packaged: the call still runs (compiled by dynamo in place), says why."""
    def backend(gm, example_inputs):
        return gm.forward

    model = copy.deepcopy(transformer)
    stats = aot_regions.Stats()
    _install(model, tmp_path, stats, kwargs=dict(backend=backend, fullgraph=True, dynamic=False))
    with torch.no_grad():
        out = model(**_inputs(model))[0]
        from optimizations.compile import strip_compiled

        strip_compiled(model)
        ref = model(**_inputs(model))[0]
    assert stats.compiled == 0 and stats.to_dynamo == 2
    assert all("AOT compile failed" in n for n in stats.notes)
    assert torch.equal(out, ref)


def test_a_block_with_hooks_runs_them_after_a_dynamo_fallback(transformer, tmp_path):
    """A block's forward and its _call_impl (taken once it has hooks) are separate dynamo compiles: the hook runs
    even when the block's forward already went to dynamo."""
    def backend(gm, example_inputs):
        return gm.forward

    model = copy.deepcopy(transformer)
    _install(model, tmp_path, aot_regions.Stats(), kwargs=dict(backend=backend, fullgraph=False, dynamic=False))
    seen = []
    with torch.no_grad():
        model(**_inputs(model))  # every block's forward compiled by dynamo (the backend cannot be packaged)
        handle = model.transformer_blocks[0].register_forward_hook(lambda *a: seen.append(1))
        try:
            model(**_inputs(model))
        finally:
            handle.remove()
    assert seen == [1]


def test_a_stale_or_unreadable_package_is_compiled_again(transformer, tmp_path, monkeypatch):
    model = copy.deepcopy(transformer)
    _install(model, tmp_path, aot_regions.Stats())
    with torch.no_grad():
        model(**_inputs(model))
        monkeypatch.setattr(aot_regions, "_sources_unchanged", lambda entry: "diffusers lines 1-9 changed")
        stale = aot_regions.Stats()
        _install(copy.deepcopy(transformer), tmp_path, stale)
        fresh = copy.deepcopy(transformer)
        _install(fresh, tmp_path, stale)
        fresh(**_inputs(fresh))
        monkeypatch.undo()
        for p in tmp_path.glob("*.bin"):
            p.write_bytes(b"not a package")
        corrupt = aot_regions.Stats()
        other = copy.deepcopy(transformer)
        _install(other, tmp_path, corrupt)
        other(**_inputs(other))
    assert (stale.loaded, stale.compiled) == (0, 2) and all("is stale" in n for n in stale.notes)
    assert (corrupt.loaded, corrupt.compiled) == (0, 2) and all("could not load" in n for n in corrupt.notes)


def test_source_check_compares_the_inlined_lines_with_their_recorded_hash():
    lines, first = inspect.getsourcelines(aot_regions.input_signature)
    digest = hashlib.sha256("".join(lines).encode()).hexdigest()

    def entry(checksum):
        src = SimpleNamespace(module="optimizations.compiling.aot_regions", firstlineno=first,
                              lastlineno=first + len(lines), checksum=checksum)
        return SimpleNamespace(source_info=lambda: SimpleNamespace(inlined_sources=[src]))

    assert aot_regions._sources_unchanged(entry(digest)) is None
    assert "changed" in aot_regions._sources_unchanged(entry("0" * 64))


def test_signature_separates_what_a_static_compile_specialises_on():
    x = torch.zeros(2, 3)
    sig = aot_regions.input_signature((x,), {"a": None})
    assert sig == aot_regions.input_signature((torch.ones(2, 3),), {"a": None})  # values do not matter
    assert sig != aot_regions.input_signature((torch.zeros(3, 2),), {"a": None})  # shape
    assert sig != aot_regions.input_signature((x.t().contiguous().t(),), {"a": None})  # strides
    assert sig != aot_regions.input_signature((x.half(),), {"a": None})  # dtype
    assert sig != aot_regions.input_signature((x,), {"a": 1})  # constants
    with pytest.raises(aot_regions.UnsupportedInput):
        aot_regions.input_signature((object(),), {})


def test_structure_sees_processors_and_instance_forwards(transformer):
    block = copy.deepcopy(transformer.single_transformer_blocks[0])
    base = aot_regions.module_structure(block)
    assert aot_regions.module_structure(copy.deepcopy(block)) == base
    block.attn.processor = type("OtherProcessor", (), {"__call__": lambda self, *a, **k: None})()
    assert aot_regions.module_structure(block) != base


def test_the_modulation_table_pickles_without_its_host_bookkeeping():
    """torch's guard serialiser pickles what a compiled block reads; the table's `timesteps` closure reaches the
    pipeline (on the GPU, CUDA events a request swapped in, which cannot be pickled)."""
    import pickle

    from optimizations.modulation_table import TableState

    state = TableState(table=torch.zeros(2, 3), keys=torch.zeros(2, 4), idx=torch.zeros(1, dtype=torch.long),
                       misses=torch.zeros((), dtype=torch.long), timesteps=lambda: None, entries={"k": object()})
    back = pickle.loads(pickle.dumps(state))
    assert back.timesteps is None and back.entries == {} and torch.equal(back.table, state.table)


def test_compile_reports_whether_regions_are_saved(cache_dir, monkeypatch):
    from optimizations.compile import Compile

    svc = SimpleNamespace(compile_cache=SimpleNamespace(path=cache_dir / "x.bin", key="k"))
    assert Compile().aot_unavailable(svc) is None or "torch" in Compile().aot_unavailable(svc)
    assert "full-scope" in Compile(scope="full").aot_unavailable(svc)
    assert "no compile cache" in Compile().aot_unavailable(SimpleNamespace(compile_cache=None))
    monkeypatch.setenv(aot_regions.ENV, "0")
    assert Compile().aot_unavailable(svc) == f"{aot_regions.ENV}=0"
