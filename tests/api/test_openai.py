"""The OpenAI-compatible routes through the official `openai` SDK, against the app in process (the SDK's HTTP client
is a TestClient) with the tiny model on CPU: generate, edit, n, sizes, extra_body, quality tiers, the report,
streaming partial images, and the SDK's typed errors. 256-pixel sides and 2-4 steps unless a test needs more."""
from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from PIL import Image

from kontext_server.api.app import ServerSettings, create_app
from kontext_server.service.steps import preview_steps
from tests.helpers import png_b64

FAST = {"steps": 2}


def png_bytes(width=256, height=256, color=(200, 30, 30)) -> bytes:
    return base64.b64decode(png_b64(width, height, color))


def image_of(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


class MemoryStore:
    """An OutputStore (kontext_server/storage/base.py): keeps what it is given, hands out memory:// URLs."""
    kind = "memory"

    def __init__(self):
        self.items: list[tuple[bytes, str]] = []
        self.expiries: list[float] = []

    def save(self, data: bytes, content_type: str, expires_at: float) -> str:
        self.items.append((data, content_type))
        self.expiries.append(expires_at)
        return str(len(self.items) - 1)

    def url(self, key: str, expires_at: float, base_url: str) -> str:
        return f"memory://{key}"

    def delete(self, key: str) -> None:
        pass

    def sweep(self, now: float) -> int:
        return 0


@pytest.fixture(scope="module")
def service(cache_dir):
    from kontext_server.service import FluxService, ServiceConfig

    svc = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations="auto", cache_dir=cache_dir))
    svc.load()
    return svc


@pytest.fixture(scope="module")
def http(service):
    with TestClient(create_app(service, ServerSettings(max_queue=4, load_in_background=False))) as tc:
        yield tc


@pytest.fixture(scope="module")
def sdk(http):
    return OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


# ---------------------------------------------------------------------------------------------------------------
# generate and edit
# ---------------------------------------------------------------------------------------------------------------
def test_generate_returns_n_decodable_images_of_the_asked_size_with_our_report(sdk):
    r = sdk.images.generate(prompt="a red car", size="256x256", n=2, extra_body={**FAST, "seed": 11})
    assert len(r.data) == 2 and all(d.url is None for d in r.data)
    images = [image_of(d.b64_json) for d in r.data]
    assert all(im.format == "PNG" and im.size == (256, 256) for im in images)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # two samples, not one image twice
    assert (r.size, r.output_format, r.quality, r.background) == ("256x256", "png", "high", "opaque")
    assert r.usage.total_tokens == 0 and r.usage.input_tokens_details.image_tokens == 0
    report = r.kontext  # the extra top-level field, kept by the SDK's model
    assert report["seed"] == 11 and report["steps"] == 2 and (report["width"], report["height"]) == (256, 256)
    assert report["timings_ms"]["transformer"] > 0 and set(report["optimizations"]) >= {"dpm_solver", "compile"}


def test_the_report_is_in_the_headers_too(sdk):
    raw = sdk.images.with_raw_response.generate(prompt="a car", size="256x256", extra_body={**FAST, "seed": 4})
    r = raw.parse()
    assert raw.headers["x-seed"] == "4" == str(r.kontext["seed"])
    assert json.loads(raw.headers["x-timings-ms"]) == r.kontext["timings_ms"]
    applied = [k for k, o in r.kontext["optimizations"].items() if o["applied"]]
    assert raw.headers["x-optimizations"] == (",".join(applied) or "none")


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_bytes(sdk):
    def once(seed):
        return sdk.images.generate(prompt="a car", size="256x256", extra_body={**FAST, "seed": seed}).data[0].b64_json

    first = once(123)
    assert once(123) == first
    assert once(124) != first


def test_edit_takes_one_image_file_and_the_extra_fields_as_form_fields(sdk):
    r = sdk.images.edit(image=("in.png", png_bytes(), "image/png"), prompt="make it blue", size="256x256",
                        extra_body={**FAST, "seed": 3, "use_dpm_solver": True, "guidance_scale": 3.5})
    assert image_of(r.data[0].b64_json).size == (256, 256)
    k = r.kontext
    assert k["seed"] == 3 and k["steps"] == 2 and k["timings_ms"]["image_encode"] > 0  # an edit: the VAE encoded it
    assert k["optimizations"]["dpm_solver"]["applied"] is True  # "true" as a form field reached the flag


def test_an_edit_repeated_as_image_list_of_one_is_accepted(sdk):
    r = sdk.images.edit(image=[("in.png", png_bytes(), "image/png")], prompt="x", size="256x256", extra_body=FAST)
    assert image_of(r.data[0].b64_json).size == (256, 256)


def test_size_auto_gives_the_servers_default_size(sdk):
    r = sdk.images.generate(prompt="a car", size="auto", extra_body={"steps": 1, "seed": 1})
    assert r.size == "1024x1024" and image_of(r.data[0].b64_json).size == (1024, 1024)


@pytest.mark.parametrize("size", ["512x256", "256x384"])
def test_sizes_within_the_limits_are_honoured(sdk, size):
    r = sdk.images.generate(prompt="a car", size=size, extra_body={"steps": 1, "seed": 1})
    w, h = map(int, size.split("x"))
    assert r.size == size and image_of(r.data[0].b64_json).size == (w, h)


@pytest.mark.parametrize("fmt, compression, pil", [("jpeg", 40, "JPEG"), ("webp", None, "WEBP")])
def test_output_format_and_compression(sdk, fmt, compression, pil):
    kwargs = {"output_compression": compression} if compression is not None else {}
    r = sdk.images.generate(prompt="a car", size="256x256", output_format=fmt, extra_body={**FAST, "seed": 2},
                            **kwargs)
    assert r.output_format == fmt and image_of(r.data[0].b64_json).format == pil


def test_a_lower_output_compression_gives_a_smaller_jpeg(sdk):
    sizes = [len(sdk.images.generate(prompt="a car", size="256x256", output_format="jpeg", output_compression=c,
                                     extra_body={**FAST, "seed": 2}).data[0].b64_json) for c in (10, 95)]
    assert sizes[0] < sizes[1]


@pytest.mark.parametrize("quality, dpm, steps", [("low", True, 14), ("high", False, 2), ("auto", False, 2)])
def test_quality_picks_a_tier(sdk, quality, dpm, steps):
    extra = {"seed": 1} if quality == "low" else {**FAST, "seed": 1}  # low: the fast tier's own step count
    r = sdk.images.generate(prompt="a car", size="256x256", quality=quality, extra_body=extra)
    opts = r.kontext["optimizations"]
    assert opts["dpm_solver"]["applied"] is dpm and r.kontext["steps"] == steps
    assert opts["low_precision"]["requested"] is (quality == "low")  # asked for; this CPU cannot run it
    assert r.quality == ("high" if quality == "auto" else quality)


def test_an_explicit_flag_wins_over_the_quality_tier(sdk):
    r = sdk.images.generate(prompt="a car", size="256x256", quality="low",
                            extra_body={**FAST, "seed": 1, "use_dpm_solver": False})
    assert r.kontext["optimizations"]["dpm_solver"]["applied"] is False


def test_models_lists_the_served_model_and_a_request_may_name_it(sdk):
    ids = [m.id for m in sdk.models.list().data]
    assert ids == ["tiny"]
    r = sdk.images.generate(model="tiny", prompt="a car", size="256x256", extra_body={**FAST, "seed": 1})
    assert r.data[0].b64_json


def test_ignored_openai_fields_are_accepted(sdk):
    r = sdk.images.generate(prompt="a car", size="256x256", user="u1", moderation="low", background="opaque",
                            extra_body={**FAST, "seed": 1, "safety_identifier": "abc"})
    assert r.data[0].b64_json


def test_url_responses_go_through_the_output_store_when_one_is_plugged_in(service):
    store = MemoryStore()
    with TestClient(create_app(service, ServerSettings(load_in_background=False), output_store=store)) as tc:
        sdk = OpenAI(base_url="http://testserver/v1", api_key="x", http_client=tc, max_retries=0)
        r = sdk.images.generate(prompt="a car", size="256x256", n=2, response_format="url",
                                extra_body={**FAST, "seed": 1})
    assert [d.url for d in r.data] == ["memory://0", "memory://1"] and all(d.b64_json is None for d in r.data)
    assert [ct for _, ct in store.items] == ["image/png", "image/png"]
    assert Image.open(io.BytesIO(store.items[0][0])).size == (256, 256)


# ---------------------------------------------------------------------------------------------------------------
# streaming
# ---------------------------------------------------------------------------------------------------------------
def test_preview_steps_are_evenly_spaced_before_the_last_step():
    assert preview_steps(28, 3) == [7, 14, 21]
    assert preview_steps(4, 2) == [1, 3]
    assert preview_steps(2, 3) == [1]  # fewer steps than previews: fewer previews
    assert preview_steps(1, 3) == [] and preview_steps(28, 0) == []


def test_a_stream_sends_the_partial_images_in_order_then_the_completed_image(sdk):
    events = list(sdk.images.generate(prompt="a car", size="256x256", stream=True, partial_images=2,
                                      extra_body={"steps": 4, "seed": 9}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:-1]] == [0, 1]
    images = [image_of(e.b64_json) for e in events]
    assert all(im.size == (256, 256) and im.format == "PNG" for im in images)
    assert len({im.tobytes() for im in images}) == 3  # each preview is a different stage of the denoising
    done = events[-1]
    assert done.size == "256x256" and done.usage.total_tokens == 0
    assert done.kontext["seed"] == 9 and done.kontext["timings_ms"]["preview"] > 0
    same = sdk.images.generate(prompt="a car", size="256x256", extra_body={"steps": 4, "seed": 9})
    assert same.data[0].b64_json == done.b64_json  # streaming changes nothing in the image


def test_an_edit_stream_uses_the_edit_event_names(sdk):
    events = list(sdk.images.edit(image=("in.png", png_bytes(), "image/png"), prompt="x", size="256x256", stream=True,
                                  partial_images=1, extra_body={"steps": 2, "seed": 1}))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]


def test_a_stream_without_partial_images_sends_only_the_completed_image(sdk):
    events = list(sdk.images.generate(prompt="a car", size="256x256", stream=True, partial_images=0,
                                      extra_body={**FAST, "seed": 1}))
    assert [e.type for e in events] == ["image_generation.completed"]


def test_a_stream_sends_its_seed_in_the_headers(http):
    with http.stream("POST", "/v1/images/generations", json={"prompt": "a car", "size": "256x256", "stream": True,
                                                             "steps": 1}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        seed = int(r.headers["x-seed"])
        body = r.read().decode()
    completed = json.loads(body.strip().split("\n")[-1].removeprefix("data: "))
    assert completed["kontext"]["seed"] == seed


# ---------------------------------------------------------------------------------------------------------------
# the SDK's typed errors
# ---------------------------------------------------------------------------------------------------------------
def raises(exc_type, fn, **kwargs):
    with pytest.raises(exc_type) as info:
        fn(**kwargs)
    err = info.value
    assert err.body["type"] and err.body["message"]  # OpenAI's error object
    return err


@pytest.mark.parametrize("size", ["1000x1000", "4096x4096", "big", "128x128"])
def test_a_bad_size_is_a_bad_request_naming_size(sdk, size):
    err = raises(openai.BadRequestError, sdk.images.generate, prompt="x", size=size)
    assert err.param == "size" and err.body["type"] == "invalid_request_error" and size in err.message


def test_a_mask_is_a_bad_request_saying_kontext_takes_none(sdk):
    err = raises(openai.BadRequestError, sdk.images.edit, image=("in.png", png_bytes(), "image/png"),
                 mask=("mask.png", png_bytes(), "image/png"), prompt="x")
    assert err.param == "mask" and "takes no mask" in err.message


def test_a_fifth_image_is_a_bad_request_naming_image(sdk):
    err = raises(openai.BadRequestError, sdk.images.edit, image=[("a.png", png_bytes(), "image/png")] * 5, prompt="x")
    assert err.param == "image" and "at most 4 reference images" in err.message and "has 5" in err.message


def test_another_model_is_not_found(sdk):
    err = raises(openai.NotFoundError, sdk.images.generate, prompt="x", model="dall-e-3")
    assert err.param == "model" and err.code == "model_not_found" and "'tiny'" in err.message


@pytest.mark.parametrize("extra, param", [({"use_complie": True}, "use_complie"), ({"width": 256}, "width"),
                                          ({"steps": 0}, "steps"), ({"seed": -1}, "seed")])
def test_unknown_and_out_of_range_extra_fields_are_bad_requests_naming_them(sdk, extra, param):
    err = raises(openai.BadRequestError, sdk.images.generate, prompt="x", extra_body=extra)
    assert err.param == param


@pytest.mark.parametrize("kwargs, param", [
    ({"style": "vivid"}, "style"), ({"background": "transparent"}, "background"), ({"quality": "hd"}, "quality"),
    ({"output_format": "gif"}, "output_format"), ({"n": 5}, "n"), ({"partial_images": 4}, "partial_images"),
    ({"output_compression": 101}, "output_compression"), ({"extra_body": {"complexity": "high"}}, "complexity")])
def test_openai_fields_that_would_change_the_output_here_are_refused(sdk, kwargs, param):
    err = raises(openai.BadRequestError, sdk.images.generate, prompt="x", **kwargs)
    assert err.param == param


def test_url_responses_come_from_the_default_local_store_as_signed_urls_that_expire_with_the_ttl(sdk, http):
    r = sdk.images.generate(prompt="a car", size="256x256", response_format="url", extra_body={**FAST, "seed": 1})
    url = r.data[0].url
    assert r.data[0].b64_json is None and url.startswith("http://testserver/v1/files/") and "sig=" in url
    expires = int(url.split("expires=")[1].split("&")[0])
    assert abs(expires - (time.time() + 3600)) < 60  # the default --result-ttl
    fetched = http.get(url)
    assert fetched.status_code == 200 and Image.open(io.BytesIO(fetched.content)).size == (256, 256)


def test_a_url_response_cannot_be_streamed(sdk):
    err = raises(openai.BadRequestError, sdk.images.generate, prompt="x", response_format="url", stream=True)
    assert err.param == "response_format" and "stream sends b64_json" in err.message


def test_a_stream_of_several_images_is_refused(sdk):
    err = raises(openai.BadRequestError, sdk.images.generate, prompt="x", n=2, stream=True)
    assert err.param == "n"


def test_an_undecodable_edit_image_is_a_bad_request_naming_image(sdk):
    err = raises(openai.BadRequestError, sdk.images.edit, image=("in.png", b"not an image", "image/png"), prompt="x")
    assert err.param == "image"


def test_a_blank_prompt_is_a_bad_request_naming_prompt(sdk):
    err = raises(openai.BadRequestError, sdk.images.generate, prompt="   ", extra_body=FAST)
    assert err.param == "prompt"


def test_a_strict_request_that_cannot_be_served_is_a_bad_request_naming_the_flag(sdk):
    err = raises(openai.BadRequestError, sdk.images.generate, prompt="x", size="256x256",
                 extra_body={"strict": True, "use_mxfp4": True})
    assert err.param == "use_mxfp4" and err.code == "strict"


def test_fastapis_own_errors_on_v1_paths_are_openai_shaped(http):
    r = http.post("/v1/images/generations", content=b"{bad json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = http.post("/v1/images/edits", json={"prompt": "x"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]["message"]
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = http.post("/inference", content=b"{bad json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "validation_error"  # /inference keeps its own shape


def test_an_unknown_form_field_on_edits_is_refused_by_name(http):
    r = http.post("/v1/images/edits", files={"image": ("in.png", png_bytes(), "image/png")},
                  data={"prompt": "x", "colour": "red"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "colour"
    r = http.post("/v1/images/edits", files={"image": ("in.png", png_bytes(), "image/png")},
                  data={"prompt": ["x", "y"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
