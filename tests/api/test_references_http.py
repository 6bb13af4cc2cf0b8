"""Several reference images and the size fields over HTTP (the app in process, tiny model, 256x256, 2 steps):
`images` on /inference and repeated `image[]` parts on /v1/images/edits, their limits as 422 / 400 naming the
field, and `size_reason` in both responses."""
from __future__ import annotations

import base64

import numpy as np

from tests.helpers import decode_b64_image, png_b64

SMALL = {"prompt": "combine them", "width": 256, "height": 256, "steps": 2, "seed": 3}
A, B, C = png_b64(256, 256, (200, 30, 30)), png_b64(256, 256, (30, 200, 30)), png_b64(320, 192, (30, 30, 200))


def pixels(body: dict) -> np.ndarray:
    return np.asarray(decode_b64_image(body["images"][0]))


def test_inference_takes_a_list_of_images_and_each_count_gives_another_image(client):
    one = client.post("/inference", json=dict(SMALL, images=[A]))
    two = client.post("/inference", json=dict(SMALL, images=[A, B]))
    three = client.post("/inference", json=dict(SMALL, images=[A, B, C]))
    assert [r.status_code for r in (one, two, three)] == [200, 200, 200], three.text[:300]
    assert [r.json()["references"] for r in (one, two, three)] == [1, 2, 3]
    assert not np.array_equal(pixels(one.json()), pixels(two.json()))
    assert not np.array_equal(pixels(two.json()), pixels(three.json()))
    single = client.post("/inference", json=dict(SMALL, image=A)).json()
    np.testing.assert_array_equal(pixels(single), pixels(one.json()))  # `image` is `images` of one
    assert single["size_reason"] == "width and height as given"


def test_five_images_or_image_and_images_together_are_a_422_naming_images(client):
    for body in (dict(SMALL, images=[A] * 5), dict(SMALL, image=A, images=[B]), dict(SMALL, images=[])):
        r = client.post("/inference", json=body)
        assert r.status_code == 422, r.text[:300]
        assert [d["field"] for d in r.json()["detail"]] == ["images"]


def test_a_bad_image_in_the_list_is_named_by_its_index(client):
    r = client.post("/inference", json=dict(SMALL, images=[A, "not base64!"]))
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "images.1"


def test_aspect_ratio_and_megapixels_choose_the_size_and_the_response_says_why(client):
    body = {"prompt": "a red car", "steps": 1, "seed": 1, "aspect_ratio": "1:1", "megapixels": 0.0625}
    r = client.post("/inference", json=body)
    assert r.status_code == 200, r.text[:300]
    out = r.json()
    assert (out["width"], out["height"]) == (256, 256)
    assert out["size_reason"] == "aspect_ratio 1:1 (1.00:1) at 0.0625 megapixels"
    bad = client.post("/inference", json=dict(body, width=256))
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "aspect_ratio"


def png_bytes(b64: str) -> bytes:
    return base64.b64decode(b64)


def edit(client, images: list[str], **fields):
    files = [("image[]", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images)]
    data = {"prompt": "combine them", "size": "256x256", "steps": "2", "seed": "3", **fields}
    return client.post("/v1/images/edits", files=files, data=data)


def test_the_openai_edits_route_takes_repeated_image_parts(client):
    one, two = edit(client, [A]), edit(client, [A, B])
    assert one.status_code == 200 and two.status_code == 200, two.text[:300]
    assert one.json()["kontext"]["references"] == 1 and two.json()["kontext"]["references"] == 2
    first, second = (decode_b64_image(r.json()["data"][0]["b64_json"]) for r in (one, two))
    assert not np.array_equal(np.asarray(first), np.asarray(second))
    r = edit(client, [A] * 5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


def test_the_openai_routes_take_aspect_ratio_but_not_with_a_size(client):
    r = client.post("/v1/images/generations", json={"prompt": "x", "steps": 1, "aspect_ratio": "1:1",
                                                    "megapixels": 0.0625})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["size"] == "256x256" and "0.0625 megapixels" in r.json()["kontext"]["size_reason"]
    bad = client.post("/v1/images/generations", json={"prompt": "x", "size": "256x256", "aspect_ratio": "1:1"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "aspect_ratio"
