"""Several reference images (service/references.py) on the tiny model: each one's tokens reach the transformer with
their own position ids (index 1, tiled in the row / column plane), outputs differ with the number of references and
are deterministic per seed, references of different sizes work, and warm-up / compile shapes count them."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from kontext_server.request import InferenceRequest, parse_warmup_sizes
from kontext_server.service.references import tile_offsets

SIDE = 256  # 16 x 16 = 256 tokens per 256x256 image


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


REFS = [picture(SIDE, SIDE, i) for i in range(4)]


def run(svc, refs, seed=5, **fields):
    req = InferenceRequest(prompt="put them together", width=SIDE, height=SIDE, steps=2, seed=seed, **fields)
    return svc.generate(req, refs, output_type="np")


def test_the_first_reference_sits_at_the_origin_and_each_next_one_beside_the_canvas():
    assert tile_offsets([(16, 16)]) == [(0, 0)]
    assert tile_offsets([(16, 16)] * 4) == [(0, 0), (16, 0), (0, 16), (32, 0)]
    assert tile_offsets([(32, 16), (16, 16)]) == [(0, 0), (0, 16)]  # a tall canvas grows to the right


def test_every_reference_reaches_the_transformer_with_its_own_positions(tiny_service):
    seen = []
    tiny_service.transformer_call_observer = lambda kw: seen.append((kw["hidden_states"].shape[1],
                                                                     kw["img_ids"].clone()))
    try:
        small = picture(128, 192, 9)  # 8 x 12 tokens
        run(tiny_service, [REFS[0], REFS[1], small])
    finally:
        tiny_service.transformer_call_observer = None
    tokens, ids = seen[-1]
    assert tokens == 256 + 256 + 256 + 8 * 12  # output, first, second, third (at its own size)
    out, refs = ids[:256], ids[256:]
    assert (out[:, 0] == 0).all() and (refs[:, 0] == 1).all()  # index 0: the output; 1: every reference
    first, second, third = refs[:256], refs[256:512], refs[512:]
    assert torch.equal(first[:, 1:], out[:, 1:])  # the first reference lines up with the output, as with one
    assert second[:, 1].min() == 16 and second[:, 2].min() == 0  # below the first
    assert third[:, 1].min() == 0 and third[:, 2].min() == 16 and third[:, 2].max() == 16 + 8 - 1  # to the right
    positions = {tuple(p) for p in refs[:, 1:].tolist()}
    assert len(positions) == len(refs)  # no two reference tokens share a position


def test_two_and_three_references_change_the_output_and_each_count_is_deterministic(tiny_service):
    one, two, three = (run(tiny_service, REFS[:n]).images[0] for n in (1, 2, 3))
    assert not np.array_equal(one, two) and not np.array_equal(two, three) and not np.array_equal(one, three)
    again = run(tiny_service, REFS[:2]).images[0]
    np.testing.assert_array_equal(two, again)
    other_seed = run(tiny_service, REFS[:2], seed=6).images[0]
    assert not np.array_equal(two, other_seed)


def test_a_list_of_one_reference_is_the_same_request_as_one_image(tiny_service):
    np.testing.assert_array_equal(run(tiny_service, REFS[0]).images[0], run(tiny_service, [REFS[0]]).images[0])


def test_references_of_different_sizes_work_and_the_resized_ones_are_noted(tiny_service):
    refs = [picture(300, 200, 1), picture(256, 512, 2), picture(700, 700, 3), picture(64, 48, 4)]
    res = run(tiny_service, refs)
    assert res.images[0].shape[:2] == (SIDE, SIDE) and res.references == 4
    assert any(w.startswith("images.2: resized from 700x700 to 256x256") for w in res.warnings)
    assert any(w.startswith("images.1: resized from 256x512 to 176x352") for w in res.warnings)
    assert res.timings_ms["image_encode"] > 0


def test_the_compile_shape_and_warm_up_count_the_references(tiny_service):
    from kontext_server.service.runner import compile_shape

    req = InferenceRequest(prompt="p", width=SIDE, height=SIDE)
    plan = tiny_service.plan(req)
    shapes = {compile_shape(tiny_service.registry, req, refs, plan)[3]
              for refs in (None, REFS[0], REFS[:2], REFS[:3], [REFS[0], picture(128, 128, 1)])}
    assert len(shapes) == 5 and () in shapes and ((SIDE, SIDE), (128, 128)) in shapes
    assert parse_warmup_sizes("edit2:256x256") == [(256, 256, 2)]
