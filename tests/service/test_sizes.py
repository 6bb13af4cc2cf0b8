"""service/sizes.py and the size fields of InferenceRequest: the output size for every combination of width /
height, aspect_ratio, megapixels and snap (the table of docs/api.md), an input that already fits is never resized,
the further references' encoded sizes, and the 422s for fields that cannot combine. Pure: no model."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from kontext_server.request import InferenceRequest
from kontext_server.service.sizes import (PREFERRED_KONTEXT_RESOLUTIONS, output_size, reference_notes,
                                          reference_sizes, request_size)


def img(w: int, h: int):
    return SimpleNamespace(width=w, height=h)


# (input size or None, request's size fields) -> output size: the examples docs/api.md lists
DOCUMENTED = [
    (None, {}, (1024, 1024)),
    (None, {"aspect_ratio": "16:9"}, (1360, 768)),
    (None, {"aspect_ratio": "21:9"}, (1568, 672)),
    (None, {"aspect_ratio": "9:21"}, (672, 1568)),
    (None, {"megapixels": 0.25}, (512, 512)),
    (None, {"aspect_ratio": "16:9", "snap": True}, (1392, 752)),
    (None, {"aspect_ratio": "4:3", "snap": True}, (1184, 880)),
    (None, {"snap": True, "megapixels": 0.25}, (512, 512)),
    (None, {"megapixels": 4}, (2048, 2048)),
    ((1024, 768), {}, (1184, 880)),
    ((1024, 768), {"aspect_ratio": "match_input_image", "megapixels": 0.25}, (592, 448)),
    ((1024, 768), {"aspect_ratio": "16:9"}, (1360, 768)),
    ((672, 1568), {}, (672, 1568)),
    ((672, 1568), {"snap": True}, (672, 1568)),
    ((1024, 1024), {}, (1024, 1024)),
    ((512, 512), {}, (1024, 1024)),
    ((512, 512), {"megapixels": 0.25}, (512, 512)),
    ((1000, 1000), {}, (1024, 1024)),
    ((800, 600), {"width": 512}, (512, 384)),
    ((800, 600), {"width": 512, "height": 512}, (512, 512)),
]


@pytest.mark.parametrize("source, fields, expected", DOCUMENTED)
def test_each_documented_combination_gives_its_documented_size(source, fields, expected):
    req = InferenceRequest(prompt="p", **fields)
    size = request_size(req, img(*source) if source else None)
    assert (size.width, size.height) == expected
    assert size.reason  # every size says why


def test_the_documented_table_in_api_md_matches_the_rules():
    from tests.helpers import ROOT

    text = (ROOT / "docs" / "api.md").read_text()
    for source, fields, (w, h) in DOCUMENTED:
        given = ", ".join(f'"{k}": {str(v).lower() if isinstance(v, bool) else repr(v).replace(chr(39), chr(34))}'
                          for k, v in fields.items()) or "(none)"
        row = f"| {f'{source[0]}x{source[1]}' if source else 'none'} | {given} | {w}x{h} |"
        assert row in text, row


@pytest.mark.parametrize("size", PREFERRED_KONTEXT_RESOLUTIONS)
def test_an_input_already_at_a_preferred_resolution_is_never_resized(size):
    """diffusers issue #11942: the pipeline moved a 672x1568 input to 656x1552. Here it stays, with or without snap,
    and no note says it was resized."""
    for snap in (False, True):
        out = output_size(None, None, img(*size), snap=snap)
        assert (out.width, out.height) == size
        assert not any(n.startswith("image: resized") for n in out.notes)


def test_the_preferred_resolutions_are_diffusers_own():
    from diffusers.pipelines.flux import pipeline_flux_kontext

    assert list(PREFERRED_KONTEXT_RESOLUTIONS) == list(pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS)


def test_snap_picks_the_preferred_resolution_nearest_the_inputs_aspect_and_says_so():
    out = output_size(None, None, img(800, 600), snap=True)
    assert (out.width, out.height) == (1184, 880) and "preferred resolution" in out.reason
    assert "image: resized from 800x600 to 1184x880 (the reference image is encoded at the output size)" in out.notes


def test_a_size_the_limits_cannot_keep_in_aspect_is_noted():
    out = output_size(None, None, img(10000, 10))
    assert (out.width, out.height) == (2048, 256)
    assert any("does not keep the aspect ratio" in n for n in out.notes)


@pytest.mark.parametrize("fields, field", [
    ({"aspect_ratio": "16:9", "width": 512}, "aspect_ratio"),
    ({"megapixels": 1, "height": 512}, "megapixels"),
    ({"snap": True, "width": 512, "height": 512}, "snap"),
    ({"aspect_ratio": "3:1"}, "aspect_ratio"),
    ({"aspect_ratio": "1:3"}, "aspect_ratio"),
    ({"aspect_ratio": "0:1"}, "aspect_ratio"),
    ({"aspect_ratio": "wide"}, "aspect_ratio"),
    ({"megapixels": 0.01}, "megapixels"),
    ({"megapixels": 5}, "megapixels"),
])
def test_size_fields_that_cannot_be_served_are_refused_naming_the_field(fields, field):
    with pytest.raises(ValidationError) as exc:
        InferenceRequest(prompt="p", **fields)
    assert [e["loc"][0] for e in exc.value.errors()] == [field]


def test_the_aspect_ratio_bounds_are_inclusive():
    for spec in ("21:9", "9:21", "1:1", "match_input_image", "7:3"):
        InferenceRequest(prompt="p", aspect_ratio=spec)


def test_further_references_keep_their_size_when_they_fit_and_are_scaled_down_when_larger():
    refs = [img(640, 480), img(512, 768), img(2000, 2000), img(300, 200)]
    sizes = reference_sizes(refs, 1024, 1024)
    assert sizes[0] == (1024, 1024)  # the first: the output size
    assert sizes[1] == (512, 768)  # fits: kept
    assert sizes[2] == (1024, 1024)  # larger than the output: scaled to its area
    assert sizes[3] == (288, 192)  # sides not multiples of 16: rounded down
    notes = reference_notes(refs, 1024, 1024)
    assert len(notes) == 2 and notes[0].startswith("images.2: resized from 2000x2000 to 1024x1024")
