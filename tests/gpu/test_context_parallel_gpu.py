"""Context parallelism on GPUs (marked `gpu`; skipped without CUDA; the 2-GPU tests also without a second GPU). Run on
the device machine:

    bash tools/gpu_session.sh tests tests/gpu/test_context_parallel_gpu.py          # 1 GPU: the N=1 test only
    bash tools/gpu_session.sh tests tests/gpu/test_context_parallel_gpu.py          # on nvidia-h100-x2: all

`synthetic-full` (random weights) at edit-512 / a 1008x1008 text-to-image (63 x 63 = 3,969 image tokens: padded on 2
ranks, which puts a key mask into cuDNN's SDPA). Each split generation is compared with the same request on rank 0
alone (`generate_alone`: the same loaded model, the sequence not split). bf16 sums in another order, over a few
steps of random weights: the bound is loose (relative error of the final latents), and the figures are recorded in
$OUT/gpu_checks_cp.json.
"""
from __future__ import annotations

import gc
import json
import os

import pytest
import torch
from PIL import Image

from kontext_server.request import InferenceRequest

pytestmark = pytest.mark.gpu
FIGURES: dict = {}
REL_BOUND = 0.05
EXACT_FP8 = "qkv_fusion,channels_last,attention,low_precision,modulation_table,first_block_cache,dpm_solver"


def _record(name, value):
    FIGURES[name] = value
    print(f"{name}: {value}")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_checks_cp.json"), "w") as f:
            json.dump(FIGURES, f, indent=1)


def _gpus(n: int):
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs (this machine has {torch.cuda.device_count()})")


def _service(cache_dir, degree: int, optimizations: str, ring: int = 1):
    from kontext_server.parallel.service import ParallelService
    from kontext_server.service import ServiceConfig

    svc = ParallelService(ServiceConfig(model="synthetic-full", device="cuda", cache_dir=cache_dir,
                                        optimizations=optimizations, context_parallel=degree, cp_ring=ring,
                                        cp_timeout=600))
    svc.load()
    return svc


def _close(svc):
    svc.close()
    del svc
    gc.collect()
    torch.cuda.empty_cache()


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def _compare(svc, name: str, req: InferenceRequest, image=None) -> dict:
    split = svc.generate(req, image, output_type="np")
    alone = svc.generate_alone(req, image, output_type="np")
    rel = _rel(split.latents, alone.latents)
    fig = {"latents_rel_error": round(rel, 5), "split_total_ms": split.timings_ms["total"],
           "alone_total_ms": alone.timings_ms["total"], "split_step_ms": split.timings_ms["transformer_per_step"],
           "alone_step_ms": alone.timings_ms["transformer_per_step"], "parallel": split.parallel,
           "skipped": [split.steps_skipped, alone.steps_skipped]}
    _record(name, fig)
    assert torch.isfinite(split.latents).all()
    assert rel < REL_BOUND, fig
    return fig


def _edit_image(size: int = 512) -> Image.Image:
    from kontext_server.benchmark.timing import test_image

    return test_image(size, size)


def test_the_split_path_at_n1_matches_todays_path_on_one_gpu(cache_dir):
    svc = _service(cache_dir, 1, EXACT_FP8)
    try:
        req = InferenceRequest(prompt="make it red", width=512, height=512, steps=4, seed=1)
        fig = _compare(svc, "n1_edit512_exact", req, _edit_image())
        assert fig["parallel"]["degree"] == 1
        _compare(svc, "n1_edit512_fp8", req.model_copy(update={"use_mxfp4": True}), _edit_image())
    finally:
        _close(svc)


def test_ulysses_over_two_gpus_matches_one_gpu_for_edits_text_to_image_fp8_and_the_cache(cache_dir):
    _gpus(2)
    svc = _service(cache_dir, 2, EXACT_FP8)
    try:
        assert svc.health()["context_parallel"]["ulysses"] == 2
        req = InferenceRequest(prompt="make it red", width=512, height=512, steps=4, seed=1)
        _compare(svc, "u2_edit512_exact", req, _edit_image())
        _compare(svc, "u2_edit512_fp8", req.model_copy(update={"use_mxfp4": True}), _edit_image())
        odd = InferenceRequest(prompt="a red car", width=1008, height=1008, steps=4, seed=2)
        fig = _compare(svc, "u2_t2i1008_padded_cudnn_mask", odd)
        assert fig["parallel"]["padded_tokens"]["image"] == 1
        cached = InferenceRequest(prompt="make it red", width=512, height=512, steps=12, seed=1,
                                  use_first_block_cache=True, cache_threshold=0.12)
        fig = _compare(svc, "u2_edit512_first_block_cache", cached, _edit_image())
        ranks = fig["parallel"]["ranks"]
        assert ranks["0"] == ranks["1"]
        graphs = svc.generate(req.model_copy(update={"use_cuda_graphs": True}), _edit_image())
        assert not graphs.optimizations["cuda_graphs"].applied  # refused, with the reason
        _record("u2_cuda_graphs_detail", graphs.optimizations["cuda_graphs"].detail)
    finally:
        _close(svc)


def test_ring_over_two_gpus_matches_one_gpu(cache_dir):
    _gpus(2)
    svc = _service(cache_dir, 2, "qkv_fusion,attention,modulation_table", ring=2)
    try:
        assert svc.health()["context_parallel"]["ring"] == 2
        req = InferenceRequest(prompt="make it red", width=512, height=512, steps=4, seed=1)
        _compare(svc, "r2_edit512_exact", req, _edit_image())
        from kontext_server.service import StrictError

        with pytest.raises(StrictError, match="ring attention"):  # 3,969 tokens would need padding: a 422
            svc.plan(InferenceRequest(prompt="a red car", width=1008, height=1008, steps=4))
    finally:
        _close(svc)


@pytest.mark.slow
def test_compiled_blocks_over_two_gpus_match_one_gpu(cache_dir):
    _gpus(2)
    svc = _service(cache_dir, 2, "qkv_fusion,channels_last,attention,modulation_table,compile")
    try:
        req = InferenceRequest(prompt="make it red", width=512, height=512, steps=4, seed=1)
        _compare(svc, "u2_edit512_compiled", req, _edit_image())
    finally:
        _close(svc)
