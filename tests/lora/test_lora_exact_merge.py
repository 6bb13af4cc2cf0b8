"""The exact tier's merge (FLUX_LORA_EXACT_MERGE, kontext_server/lora/exact_merge.py) on CPU: the exact tiny
transformer and its fp8 copy (tests/lora/fp8_variants.py), slots installed on both, the merge forced on ("1").

Covers: which modules it takes (every linear a slot covers that no other variant shares) and the copies' size; a
merged request against the branch with the same adapters; the weights and the output back bit for bit; the fp8
merge quantising from the copies, never from merged exact weights; the base graphs; the same adapters again writing
nothing; "auto" on a CPU and on a CUDA device short of memory; and through the service, a request without adapters
after merged ones against a fresh server."""
from __future__ import annotations

import copy

import pytest
import torch

from kontext_server.lora.exact_merge import EXACT_MERGE_HEADROOM, ExactMerge, decide
from kontext_server.lora.merged_weights import exact_weights
from tests.lora.conftest import latents, make_service
from tests.lora.fp8_variants import assert_same_adapters_write_once, build_merges, inputs, rel, run, specs

THREE = [("style", 1.0), ("light", 0.7), ("shared", -0.5)]


def build(cache_dir, lora_dir, exact_merge: str = "1"):
    return build_merges(cache_dir, lora_dir, exact_merge)


@pytest.fixture(scope="module")
def merged(cache_dir, lora_dir):
    return build(cache_dir, lora_dir)


def weights(model) -> dict[str, torch.Tensor]:
    return {n.replace(".base", ""): p.detach().clone() for n, p in model.named_parameters()}


def test_the_exact_merge_takes_every_module_a_slot_covers_and_keeps_a_copy_of_their_weights(merged):
    manager, models, _ = merged
    assert manager.path == "merged" and manager.exact_merge is not None
    report = manager.health()["branch"]["exact_merge"]
    assert manager.exact_merge.merged_slots == set(manager.slots)  # no modulation table here: plain Linears
    # one target per weight: a proj_out the exact tier splits gives two
    assert report["linears"] == sum(len(exact_weights(w)) for w in manager.wrappers["exact"].values())
    assert report["linears"] >= len(manager.slots) and report["kept_on_branch"] == {}
    covered = sum(t.weight.numel() * 2 for t in manager.exact_merge.targets)
    assert report["copies_gib"] == round(covered / 2**30, 2) and report["holds"] == "base"
    live = {t.weight.untyped_storage().data_ptr() for t in manager.exact_merge.targets}
    # the fp8 merge quantises from the copies, not from the live weights the exact merge writes
    assert manager.merge.targets and all(t.source.untyped_storage().data_ptr() not in live
                                         for t in manager.merge.targets)


def fp32_with(manager, pristine, loras) -> torch.nn.Module:
    """The base model in fp32 with the adapters' updates added to its weights in fp32: the reference both the branch
    and the merge round away from."""
    ref = copy.deepcopy(pristine).float()
    with torch.no_grad():
        for name, scale in loras:
            for module, t in manager.store.loaded[name].targets.items():
                ref.get_submodule(module).weight += scale * t.scale * (t.b.float() @ t.a.float())
    return ref


def test_a_merged_exact_request_is_as_close_to_fp32_as_the_branch_and_runs_the_base_code(merged):
    manager, models, pristine = merged
    x = inputs(models["exact"], seed=1)
    loras = specs(THREE)
    base = run(pristine["exact"], x)
    try:
        manager.set_path("fused")
        with manager.applied(loras, "exact"):
            branch = run(models["exact"], x)
    finally:
        manager.set_path("merged")
    with manager.applied(loras, "exact") as applied:
        assert applied.switch_ms is not None and applied.graph_key == ()
        assert all(s.k == 0 for s in manager.slots.values())  # the base code, on merged weights
        out = run(models["exact"], x)
    xf = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}
    effect = run(fp32_with(manager, pristine["exact"], THREE), xf) - run(fp32_with(manager, pristine["exact"], []), xf)
    # the adapters' effect on the output, each tier's against fp32's (the tiny model's bf16 rounding alone moves its
    # output by a few percent, in both; what differs is how the update is rounded)
    merged_err, branch_err = rel(out - base, effect), rel(branch - base, effect)
    print(f"tiny, three adapters, their effect against fp32's: merged {merged_err:.4f}, branch {branch_err:.4f}; "
          f"merged output vs branch output {rel(out, branch):.5f}")
    assert rel(branch, base) > 0.02 and merged_err < 1.5 * branch_err


def test_a_request_without_adapters_gets_the_base_weights_and_output_back_bit_for_bit(merged):
    manager, models, pristine = merged
    x = inputs(models["exact"], seed=2)
    before = weights(pristine["exact"])
    with manager.applied(specs([("style", 1.0)]), "exact"):
        during = weights(models["exact"])
        assert any(not torch.equal(before[n], during[n]) for n in before if n in during)
    with manager.applied([], "exact") as applied:
        assert applied.switch_ms is not None  # the restore, reported like a switch
        after = weights(models["exact"])
        assert all(torch.equal(before[n], after[n]) for n in before if n in after)
        assert torch.equal(run(models["exact"], x), run(pristine["exact"], x))
    assert manager.exact_merge.report()["holds"] == "base"


def test_an_fp8_request_after_an_exact_merge_quantises_from_the_base_weights(merged, cache_dir, lora_dir):
    """The same fp8 bytes as a server whose exact tier never merges."""
    manager, _, _ = merged
    other, _, _ = build(cache_dir, lora_dir, exact_merge="0")
    assert other.exact_merge is None and "FLUX_LORA_EXACT_MERGE=0" in other.health()["branch"]["exact_merge"]["off"]
    with manager.applied(specs([("style", 1.0)]), "exact"):  # the exact weights now hold style
        pass
    with manager.applied(specs([("light", 0.8)]), "fp8"):
        have = [t.rows.view(torch.uint8).clone() for t in manager.merge.targets]
    with other.applied(specs([("light", 0.8)]), "fp8"):
        want = [t.rows.view(torch.uint8).clone() for t in other.merge.targets]
    assert len(have) == len(want) > 0 and all(torch.equal(a, b) for a, b in zip(have, want))


def test_the_same_adapters_again_write_nothing_and_another_scale_writes_once(merged):
    assert_same_adapters_write_once(merged[0], "exact")


def test_a_weight_another_variant_shares_keeps_the_branch(merged):
    manager, models, _ = merged
    group = "transformer_blocks.0.attn.to_out.0"
    shared = manager.wrappers["exact"][group].base  # as if the fp8 copy kept this very Linear
    merge, why = ExactMerge.build(manager.wrappers["exact"], manager.slots, [shared], "1", "cpu")
    assert why is None and group not in merge.merged_slots
    assert merge.report()["kept_on_branch"] == {"its weight is shared with another variant": 1}


def test_auto_makes_no_copies_on_a_cpu_nor_where_a_cuda_device_lacks_the_room(merged, cache_dir, lora_dir,
                                                                            monkeypatch):
    manager, _, _ = build(cache_dir, lora_dir, exact_merge="auto")
    assert manager.exact_merge is None and manager.merge is not None and manager.path == "merged"
    assert manager.health()["branch"]["exact_merge"]["off"].startswith("auto: only on a CUDA device")
    need = 17 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need + EXACT_MERGE_HEADROOM - 1, 80 * 2**30))
    assert "17.0 GiB" in decide("auto", need, "cuda:0")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need + EXACT_MERGE_HEADROOM, 80 * 2**30))
    assert decide("auto", need, "cuda:0") is None and decide("0", need, "cuda:0").startswith("off")


def test_through_the_service_a_request_without_adapters_after_merged_ones_is_a_fresh_servers(cache_dir, lora_dir,
                                                                                           base_service):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLUX_LORA_EXACT_MERGE", "1")
        svc = make_service(cache_dir, lora_dir=lora_dir, lora_max_rank=8)
    lora = svc.lora
    assert lora.exact_merge is not None and lora.path == "merged"
    # the modulation table is prepared: its slots keep their branch, every block linear merges
    kept = lora.exact_merge.report()["kept_on_branch"]
    assert set(kept) == {"the modulation table"} and kept["the modulation table"] > 0
    with_style = latents(svc, [("style", 1.0)])
    again = latents(svc, [("style", 1.0)])
    assert torch.equal(with_style.latents, again.latents)
    both = latents(svc, [("style", 1.0), ("light", 0.7)])
    assert not torch.equal(both.latents, with_style.latents)
    assert torch.equal(latents(svc).latents, latents(base_service).latents)
