"""Issue 3 on CPU: each optimisation is real, switchable, reported truthfully, and lossless ones are lossless."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import transformer_inputs
from optimizations.base import DeviceInfo
from optimizations.registry import PREPARE_ORDER, STACK_ORDER, build_registry, resolve_names
from kontext_server.request import InferenceRequest
from optimizations.base import Components
from kontext_server.service import FluxService, ServiceConfig, StrictError
from utils import module_bytes

CPU = DeviceInfo("cpu", "cpu", None)
H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
BASE = dict(prompt="a red car", width=256, height=256, steps=3, seed=7)


def _service(cache_dir, opts: str) -> FluxService:
    svc = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations=opts, cache_dir=cache_dir))
    svc.load()
    return svc


@pytest.fixture(scope="module")
def plain(cache_dir):
    return _service(cache_dir, "none")


def _latents(svc, **kw):
    res = svc.generate(InferenceRequest(**{**BASE, **kw}), output_type="latent")
    return res, res.latents.float()


# ---- registry -----------------------------------------------------------------------------------------------
def test_registry_is_in_stack_order_and_prepares_compile_after_what_it_wraps():
    reg = build_registry()
    assert list(reg) == STACK_ORDER == ["compile", "qkv_fusion", "channels_last", "modulation_table",
                                        "first_block_cache", "attention",
                                        "low_precision", "dpm_solver", "cuda_graphs"]
    order = PREPARE_ORDER.index
    assert order("compile") > max(order("qkv_fusion"), order("attention"), order("low_precision"))


def test_resolve_names_auto_all_none_and_unknown():
    reg = build_registry()
    assert resolve_names("none", reg, CPU) == []
    # CPU: no load-time optimisation by default; the per-request ones stay available
    assert resolve_names("auto", reg, CPU) == ["first_block_cache", "dpm_solver"]
    assert set(resolve_names("auto", reg, H100)) == set(STACK_ORDER)
    assert resolve_names("dpm_solver,qkv_fusion", reg, CPU) == ["qkv_fusion", "dpm_solver"]
    with pytest.raises(ValueError, match="unknown optimisation"):
        resolve_names("qkv,warp_drive", reg, CPU)


def test_availability_reasons_on_cpu_and_hopper():
    reg = build_registry()
    assert "CUDA" in reg["low_precision"].available(CPU)
    assert reg["low_precision"].available(H100) is None
    assert "no fp8" in reg["low_precision"].available(DeviceInfo("cuda", "A100", (8, 0)))
    assert "CUDA" in reg["cuda_graphs"].available(CPU)
    assert reg["attention"].available(CPU)


# ---- truthful reporting ----------------------------------------------------------------------------------------
def test_unavailable_flag_is_reported_not_applied_and_strict_makes_it_422(tiny_service):
    plan = tiny_service.plan(InferenceRequest(**BASE, use_mxfp4=True, use_cuda_graphs=True))
    assert plan["low_precision"].requested and not plan["low_precision"].applied
    assert "CUDA" in plan["low_precision"].detail
    assert not plan["cuda_graphs"].applied
    with pytest.raises(StrictError) as exc:
        tiny_service.plan(InferenceRequest(**BASE, use_mxfp4=True, strict=True))
    assert ("use_mxfp4", plan["low_precision"].detail) in exc.value.problems


def test_lossy_optimisations_are_off_unless_asked(tiny_service):
    plan = tiny_service.plan(InferenceRequest(**BASE))
    assert plan["qkv_fusion"].applied and plan["channels_last"].applied  # lossless, prepared: on by default
    assert not plan["first_block_cache"].applied and not plan["dpm_solver"].applied


def test_load_time_optimisation_cannot_be_switched_off_and_says_so(tiny_service):
    plan = tiny_service.plan(InferenceRequest(**BASE, use_qkv_fusion=False))
    assert plan["qkv_fusion"].applied and "cannot" not in plan["qkv_fusion"].detail
    assert "stays on" in plan["qkv_fusion"].detail
    with pytest.raises(StrictError):
        tiny_service.plan(InferenceRequest(**BASE, use_qkv_fusion=False, strict=True))


def test_cache_combines_with_regional_compile_and_graphs_but_not_full_compile():
    svc = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations="none"))
    svc.prepared = {"compile": "x", "first_block_cache": "y", "cuda_graphs": "z"}
    plan = svc.plan(InferenceRequest(**BASE, use_first_block_cache=True))
    assert plan["first_block_cache"].applied and plan["compile"].applied and plan["cuda_graphs"].applied
    full = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations="none", compile_scope="full"))
    full.prepared = dict(svc.prepared)
    plan = full.plan(InferenceRequest(**BASE, use_first_block_cache=True))
    assert not plan["first_block_cache"].applied and "full-graph" in plan["first_block_cache"].detail


# ---- lossless optimisations are lossless ------------------------------------------------------------------------
@pytest.mark.parametrize("opt", ["qkv_fusion", "channels_last"])
def test_lossless_optimisation_matches_baseline(cache_dir, plain, opt):
    svc = _service(cache_dir, opt)
    ref_res, ref = _latents(plain)
    res, out = _latents(svc)
    assert res.optimizations[opt].applied and not ref_res.optimizations[opt].applied
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ref_img = plain.generate(InferenceRequest(**BASE), output_type="np").images[0]
    img = svc.generate(InferenceRequest(**BASE), output_type="np").images[0]
    assert abs(img - ref_img).max() < 1e-4


def test_qkv_fusion_really_fuses(cache_dir):
    svc = _service(cache_dir, "qkv_fusion")
    attn = svc.pipe.transformer.transformer_blocks[0].attn
    assert attn.fused_projections and hasattr(attn, "to_qkv")
    assert svc.pipe.vae.decoder.mid_block.attentions[0].fused_projections


def test_rewrites_that_copy_every_weight_in_skip_initialising_it_and_still_compute_the_same(plain, monkeypatch):
    """QKV fusion and the split proj_out build new linears and copy every weight in: they skip nn.Linear's random
    initialisation, which on a transformer a memory budget keeps in host memory ran on the CPU over every weight."""
    from types import SimpleNamespace

    from optimizations.base import EXACT
    from optimizations.fusions.split_proj_out import split_single_block_proj_out
    from optimizations.qkv_fusion import QKVFusion

    model, vae = copy.deepcopy(plain.pipe.transformer), copy.deepcopy(plain.pipe.vae)
    inits = []
    real_init = torch.nn.init.kaiming_uniform_
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", lambda t, *a, **k: inits.append(t.shape) or real_init(t))
    QKVFusion().prepare(SimpleNamespace(variants={EXACT: model}, pipe=SimpleNamespace(vae=vae)))
    split_single_block_proj_out(model)
    assert inits == []
    inputs = transformer_inputs(model, n_img=16, n_txt=8, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[0], plain.pipe.transformer(**inputs)[0], rtol=1e-5, atol=1e-5)


def test_skipping_linear_initialisation_holds_only_in_the_thread_that_asked_for_it(monkeypatch):
    import threading

    from optimizations.base import linears_uninitialised

    inits = []
    real_init = torch.nn.init.kaiming_uniform_
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", lambda t, *a, **k: inits.append(t.shape) or real_init(t))
    inside, other = threading.Event(), threading.Event()

    def build_elsewhere():
        inside.wait(10)
        torch.nn.Linear(4, 5)  # another thread, while the main thread skips: initialised
        other.set()

    t = threading.Thread(target=build_elsewhere)
    t.start()
    with linears_uninitialised():
        torch.nn.Linear(2, 3)
        inside.set()
        assert other.wait(10)
    t.join()
    torch.nn.Linear(6, 7)  # after the block: initialised again
    assert inits == [(5, 4), (7, 6)]


def test_channels_last_really_changes_vae_layout(cache_dir):
    svc = _service(cache_dir, "channels_last")
    w = svc.pipe.vae.decoder.conv_in.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def test_attention_backend_dispatch_matches_default(plain):
    """The mechanism the FA3-class flag uses (diffusers' per-processor backend) is lossless; on CPU we switch to
    the math kernel since cuDNN/FA3 need a GPU (the GPU test compares cuDNN)."""
    from diffusers.models.attention_dispatch import attention_backend

    _, ref = _latents(plain)
    with attention_backend("_native_math"):
        _, out = _latents(plain)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---- per-request optimisations through the service --------------------------------------------------------------
def test_dpm_solver_defaults_to_14_steps_and_changes_output(tiny_service):
    base = dict(BASE)
    base.pop("steps")
    res = tiny_service.generate(InferenceRequest(**base, use_dpm_solver=True), output_type="latent")
    assert res.steps == 14 and res.optimizations["dpm_solver"].applied and res.steps_computed == 14
    euler = tiny_service.generate(InferenceRequest(**base, steps=14), output_type="latent")
    assert euler.steps == 14 and not torch.equal(euler.latents, res.latents)
    # the scheduler swap is per request: the pipeline's own scheduler is Euler again
    assert type(tiny_service.pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_first_block_cache_through_service_counts_and_isolates(tiny_service):
    six = {**BASE, "steps": 6}
    ref = tiny_service.generate(InferenceRequest(**six), output_type="latent")
    hi = tiny_service.generate(InferenceRequest(**six, use_first_block_cache=True, cache_threshold=10),
                               output_type="latent")
    zero = tiny_service.generate(InferenceRequest(**six, use_first_block_cache=True, cache_threshold=0),
                                 output_type="latent")
    assert hi.steps_skipped > 0 and hi.steps_computed + hi.steps_skipped == 6
    assert zero.steps_skipped == 0 and torch.equal(zero.latents, ref.latents)
    again = tiny_service.generate(InferenceRequest(**six), output_type="latent")
    # No leak: a request without the cache gives the reference again. Compared to 1e-5, not bit for bit: after some
    # hundred tests in one process this CPU's fp32 GEMMs have been seen to differ in the last bit (4.8e-7) between two
    # identical requests, even in MKL's strict reproducibility mode. A leaked cache moves the output far more:
    assert (hi.latents - ref.latents).abs().max() > 1e-2
    torch.testing.assert_close(again.latents, ref.latents, rtol=0, atol=1e-5)


@pytest.mark.parametrize("aot,vae", [("1", "1"), ("1", "0"), ("0", "1")])
def test_compile_routes_vae_encode_and_decode_through_their_compiled_versions(cache_dir, monkeypatch, aot, vae):
    """With compile prepared, an edit request encodes its reference image and decodes through compiled code;
    before, through the eager one. With saved regions (FLUX_AOT_REGIONS, the default) diffusers' encode / decode
    call the VAE's encoder / decoder modules compiled in place; with dynamo's path, encode / decode are compiled
    whole (also with FLUX_AOT_VAE=0, the A/B switch). torch.compile is replaced by a recorder (inductor on CPU is
    slow); it has no `aot_compile`, so the regions fall back to dynamo, i.e. to the recorder, which names what it
    runs."""
    from PIL import Image

    compiled_calls = []

    def recording_compile(fn, **_kwargs):
        owner = getattr(fn, "__self__", None)
        name = f"{type(owner).__name__}.{fn.__name__}"

        def compiled(*args, **kwargs):
            compiled_calls.append(name)
            return fn(*args, **kwargs)
        return compiled

    monkeypatch.setenv("FLUX_AOT_REGIONS", aot)
    monkeypatch.setenv("FLUX_AOT_VAE", vae)
    saved = aot == vae == "1"
    # compile's bf16 rewrite of the single blocks reorders a sum (split_proj_out.py, tested on its own): off here,
    # so that the compiled path runs exactly the eager code
    monkeypatch.setenv("FLUX_BF16_SPLIT_PROJ_OUT", "0")
    svc = _service(cache_dir, "none")
    image = Image.new("RGB", (256, 256), (90, 140, 30))
    eager = svc.generate(InferenceRequest(**BASE), image, output_type="latent")
    monkeypatch.setattr(torch, "compile", recording_compile)
    svc.prepare(["compile"])
    assert "VAE encode and decode compiled" in svc.prepared["compile"]
    assert ("encoder and decoder saved whole" in svc.prepared["compile"]) == saved
    assert ("by dynamo: FLUX_AOT_VAE=0" in svc.prepared["compile"]) == (aot == "1" and vae == "0")
    enc, dec = ("Encoder.forward", "Decoder.forward") if saved else ("AutoencoderKL.encode", "AutoencoderKL.decode")
    compiled_calls.clear()  # drop the blocks' calls from preparing
    res = svc.generate(InferenceRequest(**BASE), image, output_type="latent")
    assert res.optimizations["compile"].applied
    # warm-up + timed run: each encodes once and decodes once (output_type="latent" skips decode)
    assert compiled_calls.count(enc) == 2 and dec not in compiled_calls
    compiled_calls.clear()
    svc.generate(InferenceRequest(**BASE), image, output_type="np")
    assert compiled_calls.count(enc) == 1 and compiled_calls.count(dec) == 1
    assert torch.equal(res.latents, eager.latents)  # the recorder runs the same eager code


def test_vae_encode_and_decode_each_trace_to_one_graph(plain):
    """What compiling them relies on: no graph break (a break would leave eager pieces between compiled ones)."""
    vae = plain.pipe.vae
    with torch.inference_mode():
        enc = torch._dynamo.explain(vae.encode)(torch.randn(1, 3, 64, 64))
        dec = torch._dynamo.explain(vae.decode)(torch.randn(1, vae.config.latent_channels, 8, 8))
    assert (enc.graph_count, enc.graph_break_count) == (1, 0), enc.break_reasons
    assert (dec.graph_count, dec.graph_break_count) == (1, 0), dec.break_reasons


def test_regionally_compiled_transformer_has_one_graph_per_block_kind(plain):
    """The first single block is fed by a double block (separate contiguous tensors), the others by a single block
    (slices of one concatenated tensor): with static shapes that stride difference alone used to compile the single
    block twice. With the outputs re-viewed, dynamo traces each block kind once (eager backend: tracing only)."""
    from torch._dynamo.utils import counters

    from optimizations.compile import canonical_single_block_outputs, strip_compiled

    ref_model = plain.pipe.transformer
    model = copy.deepcopy(ref_model)
    inputs = transformer_inputs(model, n_img=16, n_txt=8, device="cpu", dtype=torch.float32)

    def graphs_traced(m) -> int:
        torch._dynamo.reset()
        counters.clear()
        m.compile_repeated_blocks(backend="eager", fullgraph=True, dynamic=False)
        try:
            with torch.no_grad():
                out = m(**inputs)[0]
        finally:
            strip_compiled(m)
        return int(counters["stats"]["unique_graphs"]), out

    before, _ = graphs_traced(model)
    assert before == 3  # double, single fed by a double block, single fed by a single block
    n = len(model.single_transformer_blocks)
    assert canonical_single_block_outputs(model) == n and canonical_single_block_outputs(model) == 0  # idempotent
    after, out = graphs_traced(model)
    assert after == 2
    with torch.no_grad():
        assert torch.equal(out, ref_model(**inputs)[0])  # views only: not a value changes
        block = model.single_transformer_blocks[0]
        enc = torch.randn(1, 8, block.proj_out.out_features)
        img = torch.randn(1, 16, block.proj_out.out_features)
        temb = torch.randn(1, block.proj_out.out_features)
        e, h = block(hidden_states=img, encoder_hidden_states=enc, temb=temb)
    assert e.stride() == (8 * e.shape[2], e.shape[2], 1) and h.stride() == (16 * h.shape[2], h.shape[2], 1)
    # A deep copy (the fp8 variant starts as one) calls its own block's forward, not the original's.
    copied = copy.deepcopy(model).single_transformer_blocks[0]
    assert copied._forward_before_canonical_strides.__self__ is copied


def test_text_encoder_graph_runner_is_the_encoders_forward_only_while_installed(plain):
    """The plumbing (capture itself needs CUDA: tests/gpu/test_gpu.py): the encoder stays the pipeline's nn.Module,
    so diffusers still finds the execution device among the components, and its own forward comes back after."""
    from optimizations.cuda_graphs import CudaGraphEncoder

    encoder = plain.pipe.text_encoder_2
    runner = CudaGraphEncoder(encoder, pool=object())
    ids = torch.randint(0, 100, (1, 16))
    with torch.inference_mode():
        ref = encoder(ids)[0]
        with runner.installed():
            assert encoder.forward is runner and plain.pipe.components["text_encoder_2"] is encoder
            assert torch.equal(runner.eager_forward(ids)[0], ref)  # what a capture records
        assert "forward" not in encoder.__dict__ and torch.equal(encoder(ids)[0], ref)


def test_reference_image_tensor_is_exactly_what_diffusers_makes_of_the_pil_image(plain):
    """The service hands the pipeline the reference image as a [0, 1] tensor made on the device; the pipeline's
    preprocessing of it must equal its preprocessing of the PIL image, bit for bit (every uint8 value present)."""
    import numpy as np
    from PIL import Image

    from kontext_server.service import reference_image_tensor

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    pixels[:2].reshape(-1)[:256] = np.arange(256, dtype=np.uint8)  # two rows: a view
    image = Image.fromarray(pixels)
    proc = plain.pipe.image_processor
    ours = reference_image_tensor(image, 64, 48, "cpu")
    assert ours.shape == (1, 3, 48, 64) and ours.dtype == torch.float32
    assert torch.equal(ours, proc.numpy_to_pt(proc.pil_to_numpy(image)))
    assert torch.equal(proc.preprocess(ours, 48, 64), proc.preprocess(image, 48, 64))
    # a reference of another size is resized to the output's, as before (LANCZOS)
    resized = reference_image_tensor(image, 32, 32, "cpu")
    assert torch.equal(resized, proc.numpy_to_pt(proc.pil_to_numpy(image.resize((32, 32), Image.LANCZOS))))


def test_vae_interfaces_rebuilt_from_a_graphs_tensor_output_match_the_vaes_own(plain):
    """A graph returns tensors; the pipeline wants vae.encode's distribution and vae.decode's output object."""
    from optimizations.cuda_graphs import vae_decode_from_pixels, vae_encode_from_moments

    vae = plain.pipe.vae
    x, z = torch.randn(1, 3, 64, 64), torch.randn(1, vae.config.latent_channels, 8, 8)
    encode = vae_encode_from_moments(lambda x: vae.encode(x).latent_dist.parameters)
    decode = vae_decode_from_pixels(lambda z: vae.decode(z, return_dict=False)[0])
    with torch.inference_mode():
        ref = vae.encode(x).latent_dist
        for dist in (encode(x).latent_dist, encode(x, return_dict=False)[0]):
            for attr in ("mean", "logvar", "std", "var"):
                assert torch.equal(getattr(dist, attr), getattr(ref, attr)), attr
        assert torch.equal(decode(z).sample, vae.decode(z).sample)
        assert torch.equal(decode(z, return_dict=False)[0], vae.decode(z, return_dict=False)[0])


def test_cuda_graph_wiring_runs_the_real_pipeline_unchanged(cache_dir, monkeypatch):
    """The service's CUDA-graph wiring on CPU, with capture + replay replaced by direct calls (capture needs CUDA:
    tests/gpu/test_gpu.py): with graphs applied, an edit goes through the text-encoder runners, the VAE runners and the
    transformer runner and returns the same image as without."""
    import numpy as np
    from PIL import Image

    from optimizations import cuda_graphs

    class DirectTransformer:  # CudaGraphTransformer's interface, calling the module
        def __init__(self, module, pool, capture=None):
            self.module = module

        def __call__(self, **kwargs):
            return self.module(**kwargs)

        def __getattr__(self, name):
            return getattr(self.module, name)

    svc = _service(cache_dir, "none")
    image = Image.new("RGB", (256, 256), (30, 160, 90))
    ref = svc.generate(InferenceRequest(**BASE), image, output_type="np")
    calls = {"vae": 0, "text": 0}

    def direct_call(self, x):
        calls["vae"] += 1
        return self.fn(x).clone()

    def direct_encoder(self, input_ids, **kwargs):
        calls["text"] += 1
        return self.eager_forward(input_ids, **kwargs)

    monkeypatch.setattr(cuda_graphs.CudaGraphCall, "__call__", direct_call)
    monkeypatch.setattr(cuda_graphs.CudaGraphEncoder, "__call__", direct_encoder)
    monkeypatch.setattr(cuda_graphs, "CudaGraphTransformer", DirectTransformer)
    svc._set_prepared({**svc.prepared, "cuda_graphs": "test: direct calls"})
    graphs = svc.registry["cuda_graphs"]
    graphs.pool = object()
    res = svc.generate(InferenceRequest(**BASE), image, output_type="np")
    assert res.optimizations["cuda_graphs"].applied
    assert calls == {"vae": 4, "text": 4}  # warm-up + timed run: encode + decode, CLIP + T5, each
    assert set(graphs.text_encoders) == {"text_encoder", "text_encoder_2"}
    assert list(graphs.vae) == [(svc.components.vae_encode["eager"], svc.components.vae_decode["eager"])]
    assert np.array_equal(res.images[0], ref.images[0])
    assert res.timings_ms["text_encode"] > 0 and res.timings_ms["image_encode"] > 0  # still timed
    assert all("forward" not in svc.pipe.__dict__[a].__dict__ for a in ("text_encoder", "text_encoder_2"))

    # Warm-up at start-up runs only the cold (capturing) generation of a shape, once: a text-to-image shape is new.
    calls.update(vae=0, text=0)
    assert svc.warm_up(256, 256) > 0
    assert calls == {"vae": 1, "text": 2}  # one run: decode, CLIP + T5 (no reference image to encode)
    assert svc.warm_up(256, 256) == 0.0 and calls == {"vae": 1, "text": 2}  # already warm: nothing runs
    t2i = svc.generate(InferenceRequest(**BASE), output_type="np")
    assert "cold_start" not in t2i.timings_ms and calls == {"vae": 2, "text": 4}

    # With a low-precision variant prepared, a warm-up shape is warmed for it too (fp8 requests would otherwise
    # compile / capture on their own time). Here the "fp8" variant is the bf16 module under another key.
    svc.prepared["low_precision"], svc.transformer_variants["fp8"] = "test: same module", svc.pipe.transformer
    calls.update(vae=0, text=0)
    svc.warmups.clear()
    assert svc.warm_up(256, 256, edit=True) > 0
    assert calls == {"vae": 2, "text": 2}  # fp8's cold run only (bf16 edits at this shape are warm already)
    assert [(w["precision"], w["edit"]) for w in svc.warmups] == [("fp8", True)]
    fp8 = svc.generate(InferenceRequest(**BASE, use_mxfp4=True), image, output_type="np")
    assert fp8.optimizations["low_precision"].applied and "cold_start" not in fp8.timings_ms
    assert np.array_equal(fp8.images[0], ref.images[0])  # same module: same image

    # Two reference images are another shape (more tokens): `edit2:` warms it for both variants, each run encoding
    # both references once.
    calls.update(vae=0, text=0)
    svc.warmups.clear()
    assert svc.warm_up(256, 256, 2) > 0
    assert calls == {"vae": 6, "text": 4}  # per variant: two encodes and one decode, CLIP + T5
    assert [(w["precision"], w["references"]) for w in svc.warmups] == [("exact", 2), ("fp8", 2)]
    assert svc.warm_up(256, 256, 2) == 0.0  # already warm


def test_new_shapes_eager_runs_unwarmed_shapes_uncompiled_and_says_so(cache_dir, monkeypatch):
    """--new-shapes eager: after warm-up, a request at another shape runs the original code (no compile on the
    request's time, the response says compile did not apply and why); a warmed shape runs compiled. --new-shapes
    compile (the default) compiles the new shape. Dynamo's eager backend stands in for inductor (tracing only)."""
    from torch._dynamo.utils import counters

    from optimizations.compile import Compile, canonical_single_block_outputs, strip_compiled

    def compile_transformer(self, module):
        canonical_single_block_outputs(module)
        module.compile_repeated_blocks(backend="eager", fullgraph=True, dynamic=False)

    monkeypatch.setattr(Compile, "compile_transformer", compile_transformer)
    torch._dynamo.reset()
    counters.clear()
    svc = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations="compile", cache_dir=cache_dir,
                                    compile_vae=False, new_shapes="eager", warmup_sizes=[(256, 256)]))
    try:
        svc.load()
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == 2 and svc.warmups[0]["precision"] == "exact"
        warm = svc.generate(InferenceRequest(**BASE), output_type="latent")
        assert warm.optimizations["compile"].applied and "cold_start" not in warm.timings_ms
        new = svc.generate(InferenceRequest(**{**BASE, "width": 320}), output_type="latent")
        assert not new.optimizations["compile"].applied
        assert new.optimizations["compile"].detail == ("320x256 text-to-image (exact) was not warmed up: runs "
                                                       "uncompiled (--new-shapes eager)")
        assert counters["stats"]["unique_graphs"] == graphs  # nothing traced for it
        with pytest.raises(StrictError, match="use_compile"):  # asked for by name: strict makes it a 422
            svc.plan(InferenceRequest(**{**BASE, "width": 320}, use_compile=True, strict=True))
        svc.config.new_shapes = "compile"
        compiled = svc.generate(InferenceRequest(**{**BASE, "width": 320}), output_type="latent")
        assert compiled.optimizations["compile"].applied and "cold_start" in compiled.timings_ms
        assert counters["stats"]["unique_graphs"] == graphs + 2  # the new shape: both block kinds
        torch.testing.assert_close(compiled.latents, new.latents)  # the same model either way
    finally:
        strip_compiled(svc.pipe.transformer)
        torch._dynamo.reset()


# ---- compile + persistent compile cache (two processes) ---------------------------------------------------------
COMPILE_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from kontext_server.service import FluxService, ServiceConfig
    from kontext_server.request import InferenceRequest
    from torch._dynamo.utils import counters
    # VAE decode stays eager here only to keep this CPU test short; the transformer blocks are what is compiled.
    svc = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations="none", cache_dir={cache!r},
                                    compile_vae=False))
    svc.load()
    req = InferenceRequest(prompt="a red car", width=256, height=256, steps=2, seed=1)
    eager = svc.generate(req, output_type="latent")
    t0 = time.perf_counter()
    svc.prepare(["compile"])
    svc.warm_up(256, 256)
    ready = time.perf_counter() - t0
    res = svc.generate(req, output_type="latent")
    print("RESULT", json.dumps(dict(ready_s=ready, cache=svc.health()["compile_cache"],
          applied=res.optimizations["compile"].applied, eager_applied=eager.optimizations["compile"].applied,
          compiled_blocks=sum(m._compiled_call_impl is not None for m in svc.pipe.transformer.modules()),
          graphs=int(counters["stats"]["unique_graphs"]), detail=svc.prepared["compile"],
          latents_sum=float(res.latents.double().sum()),
          max_diff=float((res.latents - eager.latents).abs().max()))))
""")



def _run_compile_script(script: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_saved_regions_load_in_a_second_process_without_dynamo(tmp_path):
    """The default path (optimizations/aot_regions.py): the first process compiles each block kind whole and saves
    it, the second loads both packages, traces nothing with dynamo, and computes the same latents."""
    from kontext_server.models import tiny

    tiny.ensure_tiny_saved(tmp_path)
    script = COMPILE_SCRIPT.format(cache=str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "FLUX_AOT_REGIONS"}
    first = _run_compile_script(script, dict(env, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor")))
    second = _run_compile_script(script, dict(env, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor")))
    regions1, regions2 = first["cache"]["aot_regions"], second["cache"]["aot_regions"]
    assert (regions1["compiled"], regions1["saved"], regions1["loaded"]) == (2, 2, 0), regions1
    assert (regions2["compiled"], regions2["loaded"], regions2["to_dynamo"]) == (0, 2, 0), regions2
    assert "saved whole" in first["detail"]
    assert second["graphs"] == 0  # dynamo traced nothing (the VAE is not compiled in this script)
    assert first["compiled_blocks"] == second["compiled_blocks"] == 3
    assert first["max_diff"] < 1e-4 and second["latents_sum"] == first["latents_sum"]
    print(f"compile cold start {first['ready_s']:.1f} s, loaded {second['ready_s']:.1f} s")


@pytest.mark.slow
def test_compile_and_cache_artifacts_are_reused_by_a_second_process(tmp_path, cache_dir):
    """Dynamo's path with the mega-cache (FLUX_AOT_REGIONS=0; the VAE and any region that cannot be saved whole
    take it by default)."""
    from kontext_server.models import tiny

    tiny.ensure_tiny_saved(tmp_path)  # a fresh cache dir: the first process must miss
    script = COMPILE_SCRIPT.format(cache=str(tmp_path))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor-1"), FLUX_AOT_REGIONS="0")

    first = _run_compile_script(script, env)
    assert first["applied"] and not first["eager_applied"]
    assert first["compiled_blocks"] == 3  # regional: the tiny model's 1 double + 2 single blocks
    assert first["graphs"] == 2  # one per block kind (the single block is not compiled a second time)
    assert first["cache"]["loaded"] is False and "miss" in first["cache"]["detail"]
    assert first["cache"]["saved_bytes"] > 0
    assert first["max_diff"] < 1e-4  # compiled output matches eager
    # A different inductor cache dir: only the saved mega-cache file can make the second start warm.
    second = _run_compile_script(script, dict(env, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor-2")))
    assert second["cache"]["loaded"] is True and second["cache"]["key"] == first["cache"]["key"]
    print(f"compile cold start {first['ready_s']:.1f} s, with cache {second['ready_s']:.1f} s")
    # Inductor's own counters: the first process compiled (misses), the second took every graph from the cache.
    assert first["cache"]["fxgraph_cache_miss"] > 0
    assert second["cache"]["fxgraph_cache_hit"] > 0 and second["cache"]["fxgraph_cache_miss"] == 0
    # AOTAutograd's too: a miss or bypass would trace the blocks again although inductor's code is cached.
    assert first["cache"]["autograd_cache_miss"] == first["graphs"]  # the two block graphs (VAE not compiled here)
    assert second["cache"]["autograd_cache_hit"] == first["graphs"]
    assert second["cache"]["autograd_cache_miss"] == second["cache"]["autograd_cache_bypass"] == 0
    # Nothing new was compiled: the loaded file is not written again (first: written once, after the warm-up).
    assert (first["cache"]["saves"], first["cache"]["saves_skipped"]) == (1, 0)
    assert (second["cache"]["saves"], second["cache"]["saves_skipped"]) == (0, 1)


def test_attention_backend_context_in_a_graph_is_cacheable_once_marked():
    """diffusers' cuDNN attention backend enters torch's sdpa_kernel inside each block: dynamo leaves two private
    torch helpers in the graph, and AOTAutograd's cache bypassed those graphs on the H100 until compile marks them."""
    import torch._inductor.config as ic
    import torch.nn.functional as F
    from torch._functorch._aot_autograd.autograd_cache import BypassAOTAutogradCache, check_cacheable
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from optimizations import compile as compile_opt

    verdicts = []

    def checking_backend(gm, example_inputs):
        try:
            check_cacheable(gm)
            verdicts.append("cacheable")
        except BypassAOTAutogradCache as exc:
            verdicts.append(str(exc))
        return gm.forward

    def attention(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):  # the same context diffusers' _native_cudnn backend enters (with CUDNN)
            return F.scaled_dot_product_attention(q, k, v)

    q = torch.randn(1, 2, 8, 16)
    with ic.patch(unsafe_marked_cacheable_functions={}):  # the config module's own patch: restored on exit
        torch._dynamo.reset()
        torch.compile(attention, backend=checking_backend, fullgraph=True)(q, q, q)
        compile_opt.mark_graph_functions_cacheable()
        torch._dynamo.reset()
        torch.compile(attention, backend=checking_backend, fullgraph=True)(q, q, q)
        torch._dynamo.reset()
        assert set(ic.unsafe_marked_cacheable_functions) == set(compile_opt.CACHEABLE_GRAPH_FUNCTIONS)
    assert "_backend_from_string" in verdicts[0] and verdicts[1] == "cacheable"


def test_compile_cache_key_changes_with_everything_that_changes_the_code():
    from optimizations.compiling.cache import cache_key

    base = ("NVIDIA H100", {"num_layers": 19}, ["compile", "qkv_fusion"], "default/regional/light")
    key = cache_key(*base)
    assert key == cache_key(*base)
    assert key != cache_key("NVIDIA H200", *base[1:])
    assert key != cache_key(base[0], {"num_layers": 1}, *base[2:])
    assert key != cache_key(*base[:2], ["compile"], base[3])
    assert key != cache_key(*base[:3], "default/full/light")
    assert key != cache_key(*base[:3], "default/regional/seed")


def test_compile_cache_key_changes_with_the_code_switches(monkeypatch):
    from kontext_server.settings import CODE_SWITCHES
    from optimizations.compiling.cache import cache_key

    base = ("NVIDIA H100", {"num_layers": 19}, ["compile"], "default/regional/light")
    for var in CODE_SWITCHES:
        monkeypatch.delenv(var.name, raising=False)
    key = cache_key(*base)
    monkeypatch.setenv("FLUX_BF16_GELU_EPILOGUE", "1")  # on, as unset: the same code, the same key
    assert cache_key(*base) == key
    monkeypatch.setenv("FLUX_BF16_GELU_EPILOGUE", "0")
    assert cache_key(*base) != key


def test_code_switches_records_only_the_switches_set_away_from_their_default(monkeypatch):
    from kontext_server import settings
    from optimizations.compiling.cache import switched_off

    for var in settings.CODE_SWITCHES:
        monkeypatch.delenv(var.name, raising=False)
    assert settings.code_switches() == {}  # every switch at its default
    assert not switched_off(settings.LORA_FUSED_BRANCH)
    monkeypatch.setenv("FLUX_FP8_FUSED_NORM", "1")
    monkeypatch.setenv("FLUX_FP8_FUSED_GELU", "0")
    monkeypatch.setenv("FLUX_LORA_FUSED_BRANCH", "0")
    assert settings.code_switches() == {"FLUX_FP8_FUSED_GELU": "0", "FLUX_LORA_FUSED_BRANCH": "0"}
    assert switched_off(settings.FP8_FUSED_GELU) and not switched_off(settings.FP8_FUSED_NORM)
    assert switched_off(settings.LORA_FUSED_BRANCH)
    with pytest.raises(KeyError):  # a switch outside CODE_SWITCHES would change code without changing the cache key
        switched_off(settings.AOT_REGIONS)


def test_inductor_cache_goes_next_to_the_model_cache_unless_the_operator_chose_one(plain, cache_dir, monkeypatch,
                                                                                   tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from kontext_server.service.components import open_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing diffusers leaves behind
    cache = open_compile_cache(plain.loaded, plain.cache_root, ["compile"], "default/regional/light")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache_dir / "inductor")
    assert cache.path.parent == cache_dir / "compile"
    chosen = str(tmp_path / "operator-choice")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", chosen)
    open_compile_cache(plain.loaded, plain.cache_root, ["compile"], "default/regional/light")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == chosen


def test_qkv_fusion_frees_the_unfused_projections_and_keeps_the_floor_model(cache_dir, plain):
    from kontext_server.benchmark import floor

    svc = _service(cache_dir, "qkv_fusion")
    before = sum(p.numel() for p in plain.pipe.transformer.parameters())
    after = sum(p.numel() for p in svc.pipe.transformer.parameters())
    attn = svc.pipe.transformer.transformer_blocks[0].attn
    assert not hasattr(attn, "to_q") and not hasattr(attn, "add_q_proj")
    unfused = sum(p.numel() for n, p in plain.pipe.transformer.named_parameters()
                  if any(f".{u}." in n for u in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")))
    assert after == before  # fused copies in, unfused copies out: same parameter count
    assert "freed" in svc.prepared["qkv_fusion"] and unfused > 0
    assert floor.linear_token_params(svc.pipe.transformer) == floor.linear_token_params(plain.pipe.transformer)


def test_fp8_quantisation_leaves_the_inductor_preset_alone(monkeypatch):
    """torchao's default set_inductor_config=True turns coordinate-descent tuning on process-wide (it made the fp8
    compile 5x slower on an H200 and changed every later compile); our config must not touch inductor's settings.
    The hardware check is bypassed so the weight quantisation itself runs on CPU (no fp8 matmul is executed)."""
    import torch._inductor.config as ic
    import torchao.quantization.quant_api as quant_api
    from torchao.quantization import quantize_

    from optimizations.low_precision import quant_config

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda *a, **k: None)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)).to(torch.bfloat16)
    assert module_bytes(model) == 2 * (64 * 128 + 128 + 128 * 64 + 64)
    # inductor's own patch, not monkeypatch: in newer torch the name is an alias, which monkeypatch's undo deleted
    # (every later compile in the process then failed with "coordinate_descent_tuning does not exist")
    with ic.patch(coordinate_descent_tuning=False):
        quantize_(model, quant_config((9, 0))[0])
        assert type(model[0].weight).__name__ == "Float8Tensor"  # it really quantised
        assert ic.coordinate_descent_tuning is False
    # what the fp8 copy occupies: 1-byte weights, one fp32 scale per output row, bf16 biases
    assert module_bytes(model) == (64 * 128 + 128 * 64) + 4 * (128 + 64) + 2 * (128 + 64)


def test_fp8_quantises_every_token_wise_block_linear_and_keeps_the_rest_bf16(plain):
    """The filter is by exact name: the single blocks' own proj_out (their largest GEMM) is quantised, the top-level
    proj_out, embedders and the per-step modulation GEMVs are not."""
    from optimizations.low_precision import skip_module

    transformer = plain.pipe.transformer
    quantised = {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and not skip_module(m, n)}
    kept = {n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)} - quantised
    assert "single_transformer_blocks.0.proj_out" in quantised and "single_transformer_blocks.1.proj_mlp" in quantised
    assert "transformer_blocks.0.ff.net.2" in quantised and "transformer_blocks.0.attn.to_add_out" in quantised
    assert {"proj_out", "norm_out.linear", "x_embedder", "context_embedder",
            "transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
            "single_transformer_blocks.0.norm.linear"} <= kept
    assert all(n.startswith(("time_text_embed.", "proj_out", "norm_out", "x_embedder", "context_embedder"))
               or n.endswith(("norm1.linear", "norm1_context.linear", "norm.linear")) for n in kept)


def test_single_blocks_without_concat_compute_the_same_thing(plain):
    """The fp8 copy's single blocks call proj_out's two halves instead of proj_out(cat(...)): same maths, checked on
    every single block of the tiny transformer and on the whole transformer (fp32 on CPU; summation order only)."""
    from optimizations.fusions.split_proj_out import SplitProjOut, split_single_block_proj_out
    from optimizations.low_precision import skip_module

    ref_model = plain.pipe.transformer
    model = copy.deepcopy(ref_model)
    n = len(model.single_transformer_blocks)
    assert split_single_block_proj_out(model) == f"{n} single blocks without the proj_out concatenation"
    assert all(isinstance(b.proj_out, SplitProjOut) for b in model.single_transformer_blocks)
    inputs = transformer_inputs(model, n_img=16, n_txt=8, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[0], ref_model(**inputs)[0], rtol=1e-5, atol=1e-5)
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not skip_module(m, n)}
    assert {"single_transformer_blocks.0.proj_out.attn", "single_transformer_blocks.0.proj_out.mlp"} <= names


def test_bf16_single_blocks_without_concat_keep_their_weights_and_come_out_of_a_copy(plain):
    """The exact transformer's single blocks (split_proj_out.install_bf16, with compile) multiply by views of
    proj_out's weight instead of building the concatenation: the same output (fp32 on CPU; summation order only),
    the same state dict, idempotent, a deep copy calls its own block, and `remove` finds the rewrite also under
    compile's stride wrapper (what the fp8 preparation's copy holds) and gives diffusers' forward back."""
    from optimizations.fusions import split_proj_out
    from optimizations.compile import canonical_single_block_outputs

    ref_model = plain.pipe.transformer
    model = copy.deepcopy(ref_model)
    n = len(model.single_transformer_blocks)
    assert split_proj_out.install_bf16(model).startswith(f"{n} single blocks without the proj_out concatenation")
    assert split_proj_out.install_bf16(model).startswith("0 single blocks")  # idempotent
    assert model.state_dict().keys() == ref_model.state_dict().keys()
    assert all(type(b.proj_out) is torch.nn.Linear for b in model.single_transformer_blocks)
    inputs = transformer_inputs(model, n_img=16, n_txt=8, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        expected = ref_model(**inputs)[0]
        torch.testing.assert_close(model(**inputs)[0], expected, rtol=1e-5, atol=1e-5)
        # the views are really used: a changed weight changes the output
        w = model.single_transformer_blocks[-1].proj_out.weight
        w[:, :4] += 1.0
        assert not torch.allclose(model(**inputs)[0], expected, rtol=1e-3, atol=1e-3)
        w[:, :4] -= 1.0
    assert canonical_single_block_outputs(model) == n  # what compile_transformer does next
    copied = copy.deepcopy(model)
    block = copied.single_transformer_blocks[0]
    assert block._forward_before_canonical_strides.__self__ is block  # rebound to the copy's block
    assert split_proj_out.remove(copied) == n and split_proj_out.remove(copied) == 0
    assert not any("forward" in b.__dict__ or "_forward_before_canonical_strides" in b.__dict__
                   for b in copied.single_transformer_blocks)
    with torch.no_grad():
        torch.testing.assert_close(copied(**inputs)[0], expected, rtol=1e-5, atol=1e-5)
    assert split_proj_out.remove(model) == n  # the original keeps it until asked


def test_bf16_split_proj_out_is_on_with_compile_unless_switched_off_and_the_fp8_copy_splits_its_own(
        cache_dir, monkeypatch):
    """Compile installs the bf16 rewrite unless FLUX_BF16_SPLIT_PROJ_OUT=0 and says so; the fp8 preparation's copy
    gets SplitProjOut halves (quantised separately), or, with FLUX_FP8_SPLIT_PROJ_OUT=0, diffusers' own forward on
    its Linear, never the bf16 weight views."""
    import torchao.quantization

    from optimizations import low_precision
    from optimizations.fusions import split_proj_out
    from optimizations.compile import Compile

    def Service(transformer):  # what Compile.prepare and LowPrecision.prepare act on
        return Components(pipe=None, device_info=H100, variants={"exact": transformer})

    monkeypatch.setattr(torchao.quantization, "quantize_", lambda *a, **k: None)  # fp8 needs a GPU
    svc = _service(cache_dir, "none")
    t = svc.pipe.transformer
    n = len(t.single_transformer_blocks)
    monkeypatch.setenv(split_proj_out.BF16_ENV.name, "0")
    assert "concatenation" not in Compile(compile_vae=False).prepare(Service(t))
    assert split_proj_out.remove(t) == 0
    monkeypatch.delenv(split_proj_out.BF16_ENV.name)
    on = Service(t)
    assert f"{n} single blocks without the proj_out concatenation" in Compile(compile_vae=False).prepare(on)
    low_precision.LowPrecision().prepare(on)
    fp8 = on.variants["fp8"]
    assert all(isinstance(b.proj_out, split_proj_out.SplitProjOut) for b in fp8.single_transformer_blocks)
    monkeypatch.setenv("FLUX_FP8_SPLIT_PROJ_OUT", "0")
    low_precision.LowPrecision().prepare(on)
    fp8 = on.variants["fp8"]
    assert all(type(b.proj_out) is torch.nn.Linear and "forward" not in b.__dict__
               for b in fp8.single_transformer_blocks)
    assert split_proj_out.remove(t) == n  # the bf16 transformer kept it


def test_gelu_epilogue_rewrite_is_exact_on_cpu_and_comes_out_of_a_copy(plain):
    """The bf16 GELU epilogue (optimizations/gelu_epilogue.py): every FF / MLP input linear of the tiny
    transformer is rewritten, the output is unchanged on CPU (there it computes diffusers' maths; the cuBLASLt path is
    checked in tests/gpu/test_gpu.py), a deep copy calls its own modules, and `remove` restores diffusers' forwards."""
    from optimizations.fusions import gelu_epilogue

    ref_model = plain.pipe.transformer
    model = copy.deepcopy(ref_model)
    n = len(model.transformer_blocks) * 2 + len(model.single_transformer_blocks)
    assert gelu_epilogue.install(model).startswith(f"GELU in the GEMM epilogue (cuBLASLt) for {n} ")
    assert "for 0 " in gelu_epilogue.install(model)  # idempotent
    assert model.single_transformer_blocks[0].act_mlp(torch.ones(2)).tolist() == [1.0, 1.0]  # moved into proj_mlp
    inputs = transformer_inputs(model, n_img=16, n_txt=8, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], ref_model(**inputs)[0])
    copied = copy.deepcopy(model)
    act = copied.transformer_blocks[0].ff.net[0]
    assert act.forward.__self__ is act  # rebound to the copy's module, not the original's
    modules = 2 * len(model.transformer_blocks) + 2 * len(model.single_transformer_blocks)  # single: proj + act
    assert gelu_epilogue.remove(copied) == modules
    assert not any("forward" in m.__dict__ for m in copied.modules())
    assert gelu_epilogue.remove(model) == modules and gelu_epilogue.remove(model) == 0


def test_gelu_epilogue_is_on_unless_switched_off_and_stays_out_of_the_fp8_copy(cache_dir, monkeypatch):
    """Compile installs it on the bf16 transformer unless FLUX_BF16_GELU_EPILOGUE=0, and says so; the fp8
    preparation's copy takes it out (LowPrecision.prepare calls gelu_epilogue.remove before quantising)."""
    from optimizations import low_precision
    from optimizations.fusions import gelu_epilogue
    from optimizations.compile import Compile

    def Service(transformer):  # what Compile.prepare acts on
        return Components(pipe=None, device_info=H100, variants={"exact": transformer})

    svc = _service(cache_dir, "none")
    monkeypatch.setenv(gelu_epilogue.ENV.name, "0")
    off = Service(svc.pipe.transformer)
    assert "GELU" not in Compile(compile_vae=False).prepare(off)
    assert gelu_epilogue.remove(svc.pipe.transformer) == 0  # nothing was installed
    monkeypatch.delenv(gelu_epilogue.ENV.name, raising=False)  # the default
    detail = Compile(compile_vae=False).prepare(off)
    t = svc.pipe.transformer
    n = 2 * len(t.transformer_blocks) + len(t.single_transformer_blocks)
    assert f"GELU in the GEMM epilogue (cuBLASLt) for {n} FF / MLP input linears" in detail
    # The fp8 preparation (quantisation itself stubbed: torchao's fp8 needs a GPU) copies the bf16 transformer with
    # the rewrite in it; the copy must come out with diffusers' GELU modules, for its own GELU fusion to take.
    import torchao.quantization

    monkeypatch.setattr(torchao.quantization, "quantize_", lambda *a, **k: None)
    off.device_info = H100
    low_precision.LowPrecision().prepare(off)
    fp8 = off.variants["fp8"]
    assert gelu_epilogue.remove(fp8) == 0 and not any("forward" in b.ff.net[0].__dict__ for b in fp8.transformer_blocks)
    assert gelu_epilogue.remove(t) > 0  # the bf16 transformer kept it


def test_benchmark_records_the_ab_switches_it_ran_with(plain, monkeypatch):
    from kontext_server.benchmark import report, requests
    from kontext_server.settings import CODE_SWITCHES

    for var in CODE_SWITCHES:
        monkeypatch.delenv(var.name, raising=False)
    plain_run = requests.run_request_benchmark(plain, runs=1, steps=1)
    assert plain_run["code_switches"] == {} and "switches:" not in report.to_markdown(plain_run)
    monkeypatch.setenv("FLUX_BF16_GELU_EPILOGUE", "1")  # the default, spelled out: not an A/B run
    assert requests.run_request_benchmark(plain, runs=1, steps=1)["code_switches"] == {}
    monkeypatch.setenv("FLUX_BF16_GELU_EPILOGUE", "0")
    ab = requests.run_request_benchmark(plain, runs=1, steps=1)
    assert ab["code_switches"] == {"FLUX_BF16_GELU_EPILOGUE": "0"}
    assert report.to_markdown(ab).endswith("switches: FLUX_BF16_GELU_EPILOGUE=0")


def test_single_block_rewrite_is_skipped_and_says_why(plain, monkeypatch):
    import diffusers

    from optimizations.fusions.split_proj_out import split_single_block_proj_out

    model = copy.deepcopy(plain.pipe.transformer)
    monkeypatch.setenv("FLUX_FP8_SPLIT_PROJ_OUT", "0")
    assert "unchanged (FLUX_FP8_SPLIT_PROJ_OUT=0)" in split_single_block_proj_out(model)
    monkeypatch.delenv("FLUX_FP8_SPLIT_PROJ_OUT")
    monkeypatch.setattr(diffusers, "__version__", "9.9.9")
    assert "not 9.9.9" in split_single_block_proj_out(model)
    assert all(isinstance(b.proj_out, torch.nn.Linear) for b in model.single_transformer_blocks)


def test_attention_choice_follows_what_is_importable_and_says_so(monkeypatch):
    import optimizations.attention as attention

    hopper = DeviceInfo(type="cuda", name="H100", capability=(9, 0))
    for importable, backend, phrase in ((("flash_attn_interface",), "_flash_3", "FlashAttention-3"),
                                        (("flash_attn.cute",), "_native_cudnn", "flash-attn-4 is importable"),
                                        ((), "_native_cudnn", "neither FA3 nor flash-attn-4")):
        monkeypatch.setattr(attention, "_importable", lambda mod, ok=importable: mod in ok)
        name, desc = attention.best_backend(hopper)
        assert name == backend and phrase in desc


# ---- fp8 GELU quantisation (the math, the kernel in the CPU interpreter; test_gpu.py checks it and the rewrite) -
def test_gelu_quant_reference_is_rowwise_fp8_of_the_tanh_gelu():
    import torch.nn.functional as F

    from optimizations.fp8.gelu_quant import gelu_quant_reference

    torch.manual_seed(0)
    x = torch.randn(6, 256, dtype=torch.bfloat16) * 4
    x[2] = 0
    q, s = gelu_quant_reference(x)
    y = F.gelu(x.float(), approximate="tanh")
    assert q.dtype == torch.float8_e4m3fn and s.shape == (6, 1)
    torch.testing.assert_close(s[:, 0], y.abs().amax(-1).clamp(min=1e-12) / 448)
    assert float(q.float().abs().max()) == 448.0  # each row's amax maps to the largest fp8 value
    deq = q.float() * s
    assert float((deq - y).norm() / y.norm()) < 0.04  # e4m3 keeps 3 mantissa bits
    assert (q[2].float() == 0).all()


def test_gelu_fusion_reports_why_it_did_not_run_on_cpu():
    from optimizations.fp8.gelu_quant import fuse_gelu_into_quantisation

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert fuse_gelu_into_quantisation(torch.nn.Linear(4, 4)) == "GELU quantisation not fused (needs CUDA and Triton)"


def test_fp8_linear_matches_the_float_linear_within_fp8_error():
    from optimizations.fp8.linear import Fp8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48).to(torch.bfloat16)
    fp8 = Fp8Linear.from_float(lin)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref, out = lin(x), fp8(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 0.06
    assert not any(p.dtype == torch.float8_e4m3fn for p in fp8.parameters())  # fp8 data are buffers, not weights


def test_unwrap_replaces_only_row_scaled_fp8_linears():
    """torchao cannot quantise on CPU: a stand-in weight with torchao's Float8Tensor attributes (qdata, scale,
    mm_config) checks which linears the rewrite takes and that it keeps their data."""
    from types import SimpleNamespace

    from optimizations.fp8.linear import Fp8Linear, quantize_rows, unwrap_torchao_linears

    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 8))
    q, s = quantize_rows(model[0].weight.detach())
    del model[0]._parameters["weight"]
    model[0].__dict__["weight"] = SimpleNamespace(qdata=q, scale=s, mm_config=SimpleNamespace(use_fast_accum=False),
                                                  dtype=torch.float16)  # Float8Tensor.dtype: the original dtype
    assert unwrap_torchao_linears(model).startswith("1 fp8 linears")
    assert isinstance(model[0], Fp8Linear) and isinstance(model[1], torch.nn.Linear)
    assert model[0].weight_t.data_ptr() == q.data_ptr() and model[0].use_fast_accum is False
    assert model[0].out_dtype == torch.float16  # what it writes for inputs that arrive quantised


def test_unwrap_takes_torchaos_real_fp8_weights(monkeypatch):
    """With torchao's own Float8Tensor (the hardware check bypassed so it quantises on CPU): the plain module holds
    the same fp8 bytes and scales and computes the linear within fp8 error (CPU torch._scaled_mm)."""
    import torchao.quantization.quant_api as quant_api
    from torchao.quantization import quantize_

    from optimizations.fp8.linear import Fp8Linear, unwrap_torchao_linears
    from optimizations.low_precision import quant_config

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda *a, **k: None)
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).to(torch.bfloat16)
    model = copy.deepcopy(ref)
    quantize_(model, quant_config((9, 0))[0])
    qdata, scale = model[0].weight.qdata, model[0].weight.scale
    assert unwrap_torchao_linears(model) == "2 fp8 linears as plain modules (no tensor subclass at run time)"
    assert isinstance(model[0], Fp8Linear) and isinstance(model[2], Fp8Linear)
    assert model[0].weight_t.data_ptr() == qdata.data_ptr() and torch.equal(model[0].weight_scale[0], scale[:, 0])
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out, want = model(x), ref(x)
    assert out.shape == want.shape and float((out.float() - want.float()).norm() / want.float().norm()) < 0.08
