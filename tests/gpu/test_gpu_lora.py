"""LoRA slots on the GPU (marked `gpu`; skipped without CUDA): the tiny model on CUDA with compile, CUDA graphs and
the fp8 copy. Run on the device machine:

    python -m pytest -q -m gpu tests/gpu/test_gpu_lora.py -s

With CUDA graphs each adapter request matches the same request without graphs, and a switch between adapters of the
same count captures nothing; a request without adapters is bit-identical to a server without a LoRA directory, in
both tiers; the fp8 tier with an adapter stays as close to bf16 with the adapter as fp8 is to bf16 without one; the
fused branch (the adapters' rows under the weights, the default) gives the side branch's image in each tier, within
the rounding that differs between them (on the fp8 copy, A's rows in e4m3). The fp8 merge (FLUX_LORA_FP8_MERGE=1):
it recognises torchao's quantisation of every fp8 linear, a merged request stays as close to bf16 with the adapters
as the fused branch, switches capture nothing, and the fp8 base afterwards is bit-identical to a server without
adapters. The exact merge (FLUX_LORA_EXACT_MERGE, on by default where the device has room): a merged exact request
gives the fused branch's image, its switches capture nothing, and the exact base afterwards is bit-identical. A
switch's batched slot writes (foreach ops) give on CUDA the values of the same writes issued one op each. The fp8
merge's update-rows way (gemm-u, the default) writes on CUDA what its torch reference gives, and its replay the same
bytes. A recorded switch replayed as a CUDA graph (FLUX_LORA_SWITCH_GRAPHS=1) leaves the slots as fresh writes do.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from tests.lora.conftest import REQUEST, make_service

pytestmark = pytest.mark.gpu
OPTS = "qkv_fusion,modulation_table,low_precision,compile,cuda_graphs"
TIERS = {"exact": {}, "fp8": {"use_mxfp4": True}}


def run(svc, loras=(), **flags):
    from kontext_server.request import InferenceRequest

    req = InferenceRequest(**REQUEST, **flags, loras=[{"name": n, "scale": s} for n, s in loras])
    return svc.generate(req, output_type="latent")


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def gpu_lora_dir(cache_dir, tmp_path_factory):
    from tests.lora.adapters import make_library

    source = make_library(cache_dir, tmp_path_factory.mktemp("gpu-lora-source"))
    d = tmp_path_factory.mktemp("gpu-lora")
    for name in ("style", "light", "shared"):
        shutil.copy(source / f"{name}.safetensors", d / f"{name}.safetensors")
    return d


def branch_service(cache_dir, lora_dir, fused: bool):
    """Adapters on a branch in both tiers: the merges off."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLUX_LORA_FP8_MERGE", "0")
        mp.setenv("FLUX_LORA_EXACT_MERGE", "0")
        return make_service(cache_dir, OPTS, device="cuda", lora_dir=lora_dir, fused=fused)


@pytest.fixture(scope="module")
def svc(cache_dir, gpu_lora_dir):
    return branch_service(cache_dir, gpu_lora_dir, fused=False)  # the side branch


@pytest.fixture(scope="module")
def fused_svc(cache_dir, gpu_lora_dir):
    return branch_service(cache_dir, gpu_lora_dir, fused=True)


@pytest.fixture(scope="module")
def plain(cache_dir):
    return make_service(cache_dir, OPTS, device="cuda")


def captures(svc) -> int:
    return sum(len(r.graphs) for r in svc.registry["cuda_graphs"].transformers.values())


@pytest.mark.parametrize("tier", TIERS)
def test_with_cuda_graphs_an_adapter_matches_eager_and_a_switch_captures_nothing(svc, tier):
    flags = TIERS[tier]
    graphed = run(svc, [("style", 1.0)], **flags)
    assert graphed.optimizations["cuda_graphs"].applied
    eager = run(svc, [("style", 1.0)], use_cuda_graphs=False, **flags)
    assert rel(graphed.latents, eager.latents) < 1e-3
    n = captures(svc)
    for name in ("light", "shared", "style"):
        out = run(svc, [(name, 1.0)], **flags)
        assert "cold_start" not in out.timings_ms
        assert rel(out.latents, run(svc, [(name, 1.0)], use_cuda_graphs=False, **flags).latents) < 1e-3
    assert captures(svc) == n, "an adapter switch captured a new CUDA graph"


@pytest.mark.parametrize("tier", TIERS)
def test_a_base_request_after_adapters_is_bit_identical_to_a_server_without_adapters(svc, plain, tier):
    flags = TIERS[tier]
    run(svc, [("style", 1.0), ("light", 1.0)], **flags)
    torch.testing.assert_close(run(svc, **flags).latents, run(plain, **flags).latents, rtol=0, atol=0)


def test_fp8_with_an_adapter_is_as_close_to_bf16_with_it_as_fp8_is_without(svc):
    with_adapter = rel(run(svc, [("style", 1.0)], **TIERS["fp8"]).latents, run(svc, [("style", 1.0)]).latents)
    without = rel(run(svc, **TIERS["fp8"]).latents, run(svc).latents)
    print(f"tiny, fp8 vs bf16 latents: with the adapter {with_adapter:.4f}, without {without:.4f}")
    assert with_adapter < 2 * without + 0.01


@pytest.mark.parametrize("tier", TIERS)
def test_the_fused_branch_gives_the_side_branchs_image(fused_svc, tier):
    svc = fused_svc
    flags = TIERS[tier]
    loras = [("style", 1.0), ("light", 0.5), ("shared", -0.7)]
    branch = svc.health()["lora"]["branch"]
    assert branch["path"] == "fused" and all(v["fused_modules"] > 0 for v in branch["variants"].values())
    fused = run(svc, loras, **flags)
    svc.lora.set_path("unfused")
    try:
        side = run(svc, loras, **flags)
        side_fp8_vs_bf16 = rel(run(svc, [("style", 1.0)], **TIERS["fp8"]).latents, run(svc, [("style", 1.0)]).latents)
    finally:
        svc.lora.set_path("fused")
    fused_fp8_vs_bf16 = rel(run(svc, [("style", 1.0)], **TIERS["fp8"]).latents, run(svc, [("style", 1.0)]).latents)
    diff = rel(fused.latents, side.latents)
    print(f"tiny, {tier}: fused vs side branch latents {diff:.5f}; fp8 vs bf16 with the adapter: fused "
          f"{fused_fp8_vs_bf16:.4f}, side branch {side_fp8_vs_bf16:.4f}")
    assert diff < (2e-2 if tier == "fp8" else 5e-3)
    assert fused_fp8_vs_bf16 < 2 * side_fp8_vs_bf16 + 0.01


@pytest.fixture(scope="module")
def merged_svc(cache_dir, gpu_lora_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLUX_LORA_FP8_MERGE", "1")
        mp.setenv("FLUX_LORA_EXACT_MERGE", "auto")  # the default: on, with this device's room for the copies
        return make_service(cache_dir, OPTS, device="cuda", lora_dir=gpu_lora_dir)


def test_the_fp8_merge_takes_every_fp8_linear_as_torchao_quantised_it(merged_svc):
    merge = merged_svc.health()["lora"]["branch"]["fp8_merge"]
    print(f"fp8 merge: {merge}")
    assert merged_svc.lora.path == "merged" and merge["linears"] > 0
    assert not any(r.startswith("its fp8 weight") for r in merge["kept_on_branch"]), merge["kept_on_branch"]
    assert merge["quantisers"] == {"triton_torchao": merge["linears"]}  # the one-pass kernel, in torchao's rounding
    assert merge["merge_kernel"] == "grouped"  # the merge kernel passed its check at build


def test_a_merged_fp8_request_is_as_close_to_bf16_as_the_fused_branch_and_a_switch_captures_nothing(merged_svc):
    svc = merged_svc
    loras = [("style", 1.0), ("light", 0.5), ("shared", -0.7)]
    exact = run(svc, loras).latents
    merged = run(svc, loras, **TIERS["fp8"])
    assert merged.timings_ms.get("lora_switch") is not None
    svc.lora.set_path("fused")
    try:
        fused = run(svc, loras, **TIERS["fp8"]).latents
    finally:
        svc.lora.set_path("merged")
    merged_err, fused_err = rel(merged.latents, exact), rel(fused, exact)
    print(f"tiny, fp8 vs bf16 with three adapters: merged {merged_err:.4f}, fused branch {fused_err:.4f}")
    assert merged_err < 1.5 * fused_err + 0.005
    n = captures(svc)
    for name in ("light", "shared", "style"):
        out = run(svc, [(name, 1.0)], **TIERS["fp8"])
        assert "cold_start" not in out.timings_ms and out.timings_ms.get("lora_switch") is not None
    assert captures(svc) == n, "a merged adapter switch captured a new CUDA graph"


@pytest.mark.parametrize("tier", TIERS)
def test_after_merged_requests_the_base_is_bit_identical_to_a_server_without_adapters(merged_svc, plain, tier):
    run(merged_svc, [("style", 1.0), ("light", 1.0)], **TIERS[tier])
    base = run(merged_svc, **TIERS[tier])
    assert base.timings_ms.get("lora_switch") is not None  # the weights restored first
    torch.testing.assert_close(base.latents, run(plain, **TIERS[tier]).latents, rtol=0, atol=0)


def test_a_merged_exact_request_gives_the_fused_branchs_image_and_a_switch_captures_nothing(merged_svc):
    svc = merged_svc
    merge = svc.health()["lora"]["branch"]["exact_merge"]
    print(f"exact merge: {merge}")
    assert merge.get("linears", 0) > 0 and set(merge["kept_on_branch"]) <= {"the modulation table"}, merge
    loras = [("style", 1.0), ("light", 0.5), ("shared", -0.7)]
    merged = run(svc, loras)
    assert merged.timings_ms.get("lora_switch") is not None
    svc.lora.set_path("fused")
    try:
        fused = run(svc, loras).latents
    finally:
        svc.lora.set_path("merged")
    diff = rel(merged.latents, fused)
    print(f"tiny, exact tier with three adapters: merged vs fused branch latents {diff:.5f}")
    assert diff < 5e-3  # the fused branch's own distance from the side branch is held to the same bound above
    n = captures(svc)
    for name in ("light", "shared", "style"):
        out = run(svc, [(name, 1.0)])
        assert "cold_start" not in out.timings_ms and out.timings_ms.get("lora_switch") is not None
    assert captures(svc) == n, "a merged adapter switch captured a new CUDA graph"


@pytest.mark.parametrize("way", ["own", "gemm", "gemm-u"])
def test_a_replayed_fp8_merge_gives_the_recorded_merges_image_bit_for_bit(merged_svc, way, monkeypatch):
    """The same adapters again, after a base request restored the copy: the merge replays its recorded launches
    (Fp8Merge's plans; with gemm-first, its addmms too, into the scratch rows of its arena) and the output is the
    first merge's exactly. `own`: the server's way (merge_way); else forced as the tools do."""
    from kontext_server.lora import fp8_merge

    if way != "own":
        monkeypatch.setattr(fp8_merge, "KERNEL", fp8_merge.kernel_from_spec(way))
    svc = merged_svc
    loras = [("light", 0.8), ("style", -0.3)]
    run(svc, **TIERS["fp8"])  # the base weights back: an earlier test may have left these adapters merged its way
    first = run(svc, loras, **TIERS["fp8"])
    assert first.timings_ms.get("lora_switch") is not None  # merged now, the way this test forced
    first = first.latents
    run(svc, **TIERS["fp8"])  # the base weights back
    replays = svc.health()["lora"]["branch"]["fp8_merge"]["replays"]
    again = run(svc, loras, **TIERS["fp8"])
    assert again.timings_ms.get("lora_switch") is not None
    merge = svc.health()["lora"]["branch"]["fp8_merge"]
    print(f"fp8 merge plans: {merge['plans']}, replays {merge['replays']}, scratch {merge['scratch_mib']} MiB")
    assert merge["replays"] == replays + 1
    assert merge["scratch_mib"] > 0  # every way here is gemm-first, with its scratch rows in the arena
    torch.testing.assert_close(again.latents, first, rtol=0, atol=0)


def test_batched_slot_writes_give_on_cuda_the_values_of_one_op_at_a_time(monkeypatch):
    from tests.lora.test_batched_writes import check_batched_against_one_by_one

    check_batched_against_one_by_one(monkeypatch, "cuda")


@pytest.mark.parametrize("rounding", ["torchao", "quantize_rows"])
def test_the_update_rows_way_merges_on_cuda_as_its_torch_reference_and_replays_bit_for_bit(rounding):
    """cuBLAS writes s B A into scratch rows and the compiled one-pass kernel adds W (the CPU tests run Triton's
    interpreter); one, two and three updates per weight, the last stacked into one GEMM."""
    from optimizations.kernels.fp8_weight_quant import Launch
    from tests.optimizations.test_fp8_weight_quant import QUANTISERS, segment_rows, update_rows_reference, weight

    parts, outs = [], []
    for i, (n, k) in enumerate([(48, 3072), (8, 1000), (40, 2048)]):
        w = weight((n, k), seed=10 + i)
        parts.append((w, [(*segment_rows(n, k, 3 * i + j), s) for j, s in enumerate((1.0, -0.7, 0.35)[:i + 1])]))
    record: list = []
    launch = Launch(torch.bfloat16, torch.device("cuda"), rounding == "torchao", gemm_first=True, update_rows=True,
                    record=record)
    for w, ups in parts:
        q = torch.zeros(w.shape, dtype=torch.float8_e4m3fn, device="cuda")
        s = torch.zeros(w.shape[0], dtype=torch.float32, device="cuda")
        launch.add(w.cuda(), q, s, 0, w.shape[0], [(a.cuda(), 0, b.cuda(), sc) for a, b, sc in ups])
        outs.append((q, s))
    launch.run()
    torch.cuda.synchronize()
    written = [(q.clone(), s.clone()) for q, s in outs]
    for (w, ups), (q, s) in zip(parts, written):
        own = update_rows_reference(w, ups, rounding)[0]
        differ = (q.cpu().float() != own.float()).float().mean().item()
        print(f"{rounding} {tuple(w.shape)} {len(ups)} update(s): {differ:.5f} of fp8 values off torch's")
        assert differ < 2e-3, differ
        assert not torch.equal(q.cpu().view(torch.uint8), QUANTISERS[rounding](w)[0].view(torch.uint8))
    for q, s in outs:
        q.zero_()
        s.zero_()
    for step in record:  # the recorded GEMMs and launch again: the same bytes
        step()
    torch.cuda.synchronize()
    for (q, s), (q0, s0) in zip(outs, written):
        assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0)


def test_a_switch_replayed_as_a_cuda_graph_leaves_the_slots_as_fresh_writes_and_the_same_image(fused_svc):
    """FLUX_LORA_SWITCH_GRAPHS=1 (switch_plans.py): the first switch to a set records and captures its writes, the
    next ones replay the graph (at other scales, a graph of their own); the slots then hold exactly what fresh writes
    leave, and a request its image."""
    from tests.lora.test_switch_plans import fresh, slot_memory

    svc, manager = fused_svc, fused_svc.lora
    tier = TIERS["exact"]
    run(svc, [("style", 1.0)], **tier)
    run(svc, [("light", 0.5)], **tier)
    style, light = (manager._load(n, frozenset())[0] for n in ("style", "light"))
    want_light_other = fresh(manager, [light], [0.9])
    want_style, want_light = fresh(manager, [style], [1.0]), fresh(manager, [light], [0.5])
    image = run(svc, [("light", 0.5)], **tier).latents
    manager.plans.plans.clear()
    manager.plans.graphs = True
    try:
        for _ in range(3):
            manager._write([style], [1.0], list(manager.slots))
            torch.cuda.synchronize()
            assert all(torch.equal(a, b) for a, b in zip(slot_memory(manager), want_style, strict=True))
            manager._write([light], [0.5], list(manager.slots))
            torch.cuda.synchronize()
            assert all(torch.equal(a, b) for a, b in zip(slot_memory(manager), want_light, strict=True))
        assert all(p.graphs for p in manager.plans.plans.values()) and manager.plans.replays >= 4
        for scale, want in ((0.9, want_light_other), (0.5, want_light)):  # other scales: their own graph
            manager._write([light], [scale], list(manager.slots))
            torch.cuda.synchronize()
            assert all(torch.equal(a, b) for a, b in zip(slot_memory(manager), want, strict=True))
        torch.testing.assert_close(run(svc, [("light", 0.5)], **tier).latents, image, rtol=0, atol=0)
        switched = run(svc, [("style", 1.0)], **tier)
        assert switched.timings_ms.get("lora_switch") is not None
        print(f"switch with the writes replayed as a CUDA graph: {switched.timings_ms['lora_switch']:.2f} ms")
    finally:
        manager.plans.graphs = False
        manager.plans.plans.clear()
