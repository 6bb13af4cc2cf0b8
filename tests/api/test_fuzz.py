"""Fuzzing every endpoint: property-based (hypothesis) against an app whose generation is stubbed (so valid requests
are cheap), plus hand-written hostile inputs against the real tiny model.

Properties, for every request:
- never a 5xx;
- every non-2xx answer is JSON {"error": code, "message": text} (text non-empty), and a 422 names the problem
  (the offending field appears in the message and in detail[].field);
- a 2xx answer to /inference has the shape and sizes the request asked for;
- X-Request-ID is echoed when valid and replaced by a fresh id otherwise.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import struct
import time
import zlib
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from PIL import Image

from tests.helpers import decode_b64_image, png_b64

FIELDS = ["prompt", "image", "width", "height", "steps", "guidance_scale", "true_cfg_scale", "negative_prompt", "seed",
          "num_images", "output_format", "use_compile", "use_qkv_fusion", "use_channels_last", "use_modulation_table",
          "use_first_block_cache",
          "cache_threshold", "use_flash_attention", "use_mxfp4", "use_dpm_solver", "use_cuda_graphs", "strict"]
FLAGS = [f for f in FIELDS if f.startswith("use_")] + ["strict"]
MAX_SEED = 2**63 - 1
RID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MISSING = object()

# CI runs are reproducible (derandomized); local runs explore new cases each time.
FUZZ = dict(deadline=None, derandomize=os.environ.get("CI") == "true", print_blob=True, database=None,
            # `stub` patches once per test, not per example: that is intended
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------------------------------------------
# the app under fuzz: real API, validation, planning, engine and encoding; generation stubbed
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stub_client(cache_dir):
    from kontext_server.api.app import ServerSettings, create_app
    from kontext_server.request import DEFAULT_DPM_STEPS, DEFAULT_STEPS
    from kontext_server.service import FluxService, GenerationResult, ServiceConfig
    from kontext_server.service.sizes import output_size

    svc = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations="auto", cache_dir=cache_dir))
    svc.load()

    def fake_generate(req, image=None, should_stop=None, output_type="pil", plan=None, on_step=None):
        """What service.generate decides (sizes, steps, seed, plan), without running the model."""
        plan = plan or svc.plan(req)
        size = output_size(req.width, req.height, image)
        width, height = size.width, size.height
        steps = req.steps or (DEFAULT_DPM_STEPS if plan["dpm_solver"].applied else DEFAULT_STEPS)
        if should_stop is not None and (err := should_stop()) is not None:
            raise err
        images = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(req.num_images)]
        return GenerationResult(images=images, seed=req.seed if req.seed is not None else 7, width=width,
                                height=height, steps=steps, steps_computed=steps, steps_skipped=0,
                                timings_ms={"text_encode": 0.1, "transformer": 0.2, "vae_decode": 0.1, "total": 0.4},
                                optimizations=plan, warnings=[])

    svc.generate = fake_generate  # instance attribute: GenerateJob.run calls service.generate(...)
    app = create_app(svc, ServerSettings(max_queue=64, shutdown_grace=5, load_in_background=False))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _fake_benchmark(service, runs=3, steps=4, width=256, height=256, edit=False, should_stop=None):
    return {"fake": True, "workload": {"runs": runs, "steps": steps, "width": width, "height": height, "edit": edit},
            "rows": []}


@pytest.fixture
def stub(stub_client, monkeypatch):
    """The stubbed app, with the request benchmark faked for this test only (BenchmarkJob looks it up at call time;
    the real-model tests below must see the real one)."""
    from kontext_server.benchmark import requests

    monkeypatch.setattr(requests, "run_request_benchmark", _fake_benchmark)
    return stub_client


def check_error_shape(r, field: str | None = None):
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if currently_in_test_context():
        event(f"status {r.status_code}")
    if r.status_code < 300:
        return None
    assert r.headers["content-type"].startswith("application/json"), (r.status_code, r.headers, r.text[:200])
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("message"), str) and body["message"].strip(), body
    if field is not None:
        assert r.status_code in (413, 422), (field, r.status_code, body)
        assert field in body["message"], (field, body)
        named = [d.get("field", "") for d in body.get("detail") or []]
        assert any(field in n or n == "body" for n in named), (field, body)
    return body


def post_json(client, body, headers=None):
    """Serialise like a lax client would (NaN/Infinity literals allowed) and POST it."""
    data = json.dumps(body, allow_nan=True)
    return client.post("/inference", content=data.encode("utf-8", "surrogatepass"),
                       headers={"content-type": "application/json", **(headers or {})})


# ---------------------------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------------------------
def _tiny_image_b64(w, h, fmt):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (w % 255, h % 255, 99)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


SMALL_IMAGES = [_tiny_image_b64(w, h, fmt) for (w, h, fmt) in [(1, 1, "PNG"), (20, 10, "JPEG"), (10, 40, "WEBP"),
                                                                (64, 64, "PNG")]]
text_no_surrogates = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)
prompts = text_no_surrogates.filter(lambda s: s.strip())
sides = st.integers(16, 128).map(lambda k: 16 * k)  # 256..2048, multiples of 16
junk_str = st.text(max_size=8).map(lambda s: "x" + s)  # parses as neither number nor boolean
containers = st.one_of(st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                             max_size=2))
huge = st.sampled_from([10**100, -10**100, 1e308, -1e308, float("nan"), float("inf"), float("-inf")])


@st.composite
def valid_requests(draw):
    body = {"prompt": draw(prompts)}
    optional = {
        "width": sides, "height": sides, "steps": st.integers(1, 100),
        "guidance_scale": st.floats(0, 30, allow_nan=False), "seed": st.integers(0, MAX_SEED),
        "num_images": st.integers(1, 4), "output_format": st.sampled_from(["png", "jpeg", "webp"]),
        "cache_threshold": st.floats(0, 10, allow_nan=False),
        "image": st.sampled_from(SMALL_IMAGES).flatmap(
            lambda b: st.sampled_from([b, "data:image/png;base64," + b])),
        **{f: st.none() | st.booleans() for f in FLAGS if f != "strict"}, "strict": st.booleans(),
    }
    for name, strat in optional.items():
        if draw(st.booleans()):
            body[name] = draw(strat)
    if draw(st.booleans()):
        body["true_cfg_scale"] = draw(st.floats(1.0, 30, allow_nan=False))
        if body["true_cfg_scale"] > 1.0:
            body["negative_prompt"] = draw(prompts)
    elif draw(st.booleans()):
        body["negative_prompt"] = draw(st.none() | text_no_surrogates)
    return body


BAD = {
    "prompt": st.sampled_from(["", "   ", "\n\t", MISSING, None, 5, True]) | st.just("x" * 4001) | containers,
    "image": st.one_of(st.integers(), containers, st.text(max_size=30),
                       st.binary(min_size=1, max_size=64).map(lambda b: base64.b64encode(b).decode()),
                       st.sampled_from(["data:image/png,abc", "data:image/png;base64,", "data:,", "%%%",
                                        "\u00e9t\u00e9"]),
                       st.binary(min_size=8, max_size=64).map(
                           lambda b: base64.b64encode(b"\x89PNG\r\n\x1a\n" + b).decode())),
    "width": st.one_of(st.integers(max_value=255), st.integers(min_value=2049), huge, st.booleans(), junk_str,
                       containers, st.integers(256, 2048).filter(lambda v: v % 16), st.sampled_from([256.5, 300.25])),
    "steps": st.one_of(st.integers(max_value=0), st.integers(min_value=101), huge, junk_str, containers,
                       st.sampled_from([1.5, 99.9])),
    "guidance_scale": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=30.000001), huge, junk_str,
                                containers),
    "true_cfg_scale": st.one_of(st.floats(max_value=0.999999), st.floats(min_value=30.000001), huge, junk_str,
                                containers),
    "negative_prompt": st.one_of(st.just("n" * 4001), st.integers(), containers),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=MAX_SEED + 1), huge, junk_str, containers,
                      st.sampled_from([0.5, -0.5])),
    "num_images": st.one_of(st.integers(max_value=0), st.integers(min_value=5), huge, junk_str, containers),
    "output_format": st.one_of(st.sampled_from(["PNG", "gif", "", "jpg", "png "]), st.integers(), containers),
    "cache_threshold": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=10.000001), huge, junk_str,
                                 containers),
    **{f: st.one_of(st.sampled_from(["maybe", "x", 2, -1, 0.5]), containers) for f in FLAGS},
}


SPOILERS = sorted(BAD) + ["_extra", "_cfg_without_negative"]


@st.composite
def invalid_requests(draw, kind: str):
    """(body, the field that makes it invalid): a valid request with exactly one field spoiled."""
    body = draw(valid_requests())
    if kind == "_extra":
        key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in FIELDS and k != "body"))
        body[key] = draw(st.none() | st.integers() | st.text(max_size=5))
        return body, key
    if kind == "_cfg_without_negative":
        body["true_cfg_scale"] = draw(st.floats(1.01, 30, allow_nan=False))
        body["negative_prompt"] = draw(st.sampled_from([MISSING, None, "", "  "]))
        if body["negative_prompt"] is MISSING:
            del body["negative_prompt"]
        return body, "negative_prompt"  # the field that is missing / blank
    value = draw(BAD[kind])
    if kind == "true_cfg_scale":
        body["negative_prompt"] = "blurry"  # so only the scale itself is wrong
    if value is MISSING:
        body.pop(kind, None)
    else:
        body[kind] = value
    return body, kind


json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | huge,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
junk_objects = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_junk, max_size=6)
request_ids = st.none() | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80)


# ---------------------------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------------------------
@settings(**FUZZ, max_examples=150)
@given(body=valid_requests(), rid=request_ids)
def test_fuzz_valid_requests(stub, body, rid):
    r = post_json(stub, body, headers={"X-Request-ID": rid} if rid is not None else None)
    event(f"status {r.status_code}")
    echoed = r.headers.get("x-request-id", "")
    assert RID_RE.match(echoed)
    if rid is not None and RID_RE.match(rid):
        assert echoed == rid
    if r.status_code == 422 and body.get("strict"):
        # strict: a requested optimisation that cannot run here is a 422 naming the flag
        err = check_error_shape(r)
        assert all(d["type"] == "strict" and d["field"] in FLAGS for d in err["detail"]), err
        return
    assert r.status_code == 200, r.text[:500]
    out = r.json()
    assert out["request_id"] == echoed
    assert len(out["images"]) == body.get("num_images", 1)
    assert out["output_format"] == body.get("output_format", "png")
    fmt = decode_b64_image(out["images"][0]).format
    assert fmt == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[out["output_format"]]
    if "width" in body:
        assert out["width"] == body["width"]
    if "height" in body:
        assert out["height"] == body["height"]
    if "image" not in body:
        # one side given: the other follows (square without an input image); none: 1024x1024
        side = body.get("width") or body.get("height") or 1024
        assert (out["width"], out["height"]) == (body.get("width", side), body.get("height", side))
    if "seed" in body:
        assert out["seed"] == body["seed"]
    if "steps" in body:
        assert out["steps"] == body["steps"]
    assert set(out["optimizations"]) and all({"requested", "applied", "detail"} <= set(v)
                                             for v in out["optimizations"].values())


@pytest.mark.parametrize("kind", SPOILERS)
def test_fuzz_invalid_requests_name_the_field(stub, kind):
    """~12 cases for each way of spoiling a request (23 kinds), so every field is covered on every run."""

    @settings(**FUZZ, max_examples=12)
    @given(case=invalid_requests(kind))
    def run(case):
        body, field = case
        r = post_json(stub, body)
        assert r.status_code in (413, 422), (field, body, r.status_code, r.text[:300])
        check_error_shape(r, field)

    run()


@settings(**FUZZ, max_examples=100)
@given(body=json_junk | junk_objects)
def test_fuzz_json_junk(stub, body):
    r = post_json(stub, body)
    check_error_shape(r)
    if r.status_code == 200:
        assert r.json()["images"]


@settings(**FUZZ, max_examples=60)
@given(raw=st.binary(max_size=300), ctype=st.sampled_from(["application/json", "text/plain", "",
                                                           "application/x-www-form-urlencoded", "multipart/form-data"]))
def test_fuzz_raw_bodies(stub, raw, ctype):
    r = stub.post("/inference", content=raw, headers={"content-type": ctype} if ctype else {})
    check_error_shape(r)
    assert r.status_code != 200 or json.loads(raw)  # a 200 needs a real JSON request


BENCH_LIMITS = {"runs": (1, 20), "steps": (1, 50), "width": (256, 2048), "height": (256, 2048)}
BENCH_BOOLS = {"true": True, "false": False, "1": True, "0": False}


def _bench_expectation(params: dict) -> set[str] | None:
    """Invalid fields if every value is canonical (decimal ints, plain booleans); None if not that simple."""
    bad = set()
    for k, v in params.items():
        if k == "edit":
            if v not in BENCH_BOOLS:
                return None
        elif k in BENCH_LIMITS:
            if not re.fullmatch(r"-?[0-9]+", v):
                return None
            lo, hi = BENCH_LIMITS[k]
            n = int(v)
            if not lo <= n <= hi or (k in ("width", "height") and n % 16):
                bad.add(k)
    return bad


bench_values = st.one_of(st.integers(-5, 3000).map(str), st.integers(-10**30, 10**30).map(str),
                         st.sampled_from(["true", "false", "1", "0", "yes", "maybe", "1e308", "NaN", "inf", "", "256.0",
                                          " 4", "0x10", "\u0661"]), st.text(max_size=10))


@settings(**FUZZ, max_examples=120)
@given(params=st.dictionaries(st.sampled_from(list(BENCH_LIMITS) + ["edit", "junk"]), bench_values, max_size=5))
def test_fuzz_benchmark_params(stub, params):
    r = stub.get("/benchmark", params=params)
    body = check_error_shape(r)
    known = {k: v for k, v in params.items() if k != "junk"}
    bad = _bench_expectation(known)
    if bad is None:
        return
    if not bad:
        assert r.status_code == 200, (params, r.text[:300])
        w = r.json()["workload"]
        for k in BENCH_LIMITS:
            if k in known:
                assert w[k] == int(known[k])
        if "edit" in known:
            assert w["edit"] is BENCH_BOOLS[known["edit"]]
    else:
        assert r.status_code == 422, (params, r.text[:300])
        named = {d["field"].split(".")[-1] for d in body["detail"]}
        assert named and named <= bad, (params, body)
        assert any(f in body["message"] for f in named)


@settings(**FUZZ, max_examples=60)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
       path=st.sampled_from(["/inference", "/health", "/live", "/metrics", "/benchmark", "/", "/docs/../health"])
       | st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="?#%"), max_size=20)
       .map(lambda s: "/" + s.lstrip("/")))
@example(method="GET", path="/v1").via("found by a run: OpenAI's namespace answers 404 in OpenAI's shape")
@example(method="POST", path="/v1/get_result").via("a BFL route, wrong method")
def test_fuzz_methods_and_paths(stub, method, path):
    """Any method on any path: never a 5xx, and an error in the shape of the API family the path belongs to
    (OpenAI's under /v1, BFL's on its routes, ours elsewhere)."""
    from kontext_server.api.bfl import errors as bfl_errors
    from kontext_server.api.openai import errors as openai_errors

    r = stub.request(method, path)
    assert r.status_code < 500, (method, path, r.status_code, r.text[:200])
    if r.status_code < 400 or method == "HEAD":
        return
    url_path = urlsplit(str(r.request.url)).path  # as the server routed it (the client normalises dot segments)
    if bfl_errors.is_bfl_path(url_path):
        detail = r.json()["detail"]
        assert detail and (isinstance(detail, str) or all(d.get("msg") for d in detail)), (path, r.text[:200])
    elif openai_errors.is_openai_path(url_path):
        error = r.json()["error"]
        assert error["message"].strip() and error["type"] == "invalid_request_error", (path, error)
    else:
        check_error_shape(r)


# ---------------------------------------------------------------------------------------------------------------
# hand-written hostile inputs against the real tiny model (conftest `client`: in-process, max_queue 4)
# ---------------------------------------------------------------------------------------------------------------
SMALL = {"prompt": "a red car", "width": 256, "height": 256, "steps": 1, "seed": 3}


def _png(width: int, height: int, idat: bytes, bit_depth: int = 1, color_type: int = 0) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of width x height, all zeros: tens of KB that decode to width*height pixels."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    return _png(width, height, b"".join(comp.compress(row) for _ in range(height)) + comp.flush())


@pytest.mark.parametrize("raw, field", [
    (b'{"prompt": "x"', None),  # truncated JSON
    (b'{"prompt": "x",}', None),
    (b"\xff\xfe\x00garbage", None),
    (b"null", "body"), (b"[]", "body"), (b'"a string"', "body"),
    (b'{"prompt": 5}', "prompt"),
    (b'{"prompt": {"nested": [1, {"deeper": null}]}}', "prompt"),
    (b'{"prompt": "x", "width": "wide"}', "width"),
    (b'{"prompt": "x", "steps": [1]}', "steps"),
    (b'{"prompt": "x", "width": 1e308}', "width"),
    (b'{"prompt": "x", "width": -1e308}', "width"),
    (b'{"prompt": "x", "height": 1' + b"0" * 100 + b"}", "height"),
    (b'{"prompt": "x", "seed": 1' + b"0" * 100 + b"}", "seed"),
    (b'{"prompt": "x", "steps": 1e308}', "steps"),
    (b'{"prompt": "x", "guidance_scale": 1e308}', "guidance_scale"),
    (b'{"prompt": "x", "guidance_scale": NaN}', "guidance_scale"),
    (b'{"prompt": "x", "cache_threshold": Infinity}', "cache_threshold"),
    (b'{"prompt": "x", "num_images": -Infinity}', "num_images"),
    (b'{"prompt": "x", "seed": -1}', "seed"),
    (b'{"prompt": "x", "use_complie": true}', "use_complie"),
    (b'{"prompt": "\\ud800 lone surrogate"}', "prompt"),
])
def test_malformed_and_wrong_types(client, raw, field):
    r = client.post("/inference", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    body = check_error_shape(r, field)
    assert body["error"] == "validation_error"


def test_deeply_nested_json_is_a_client_error(client):
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"):
        t0 = time.monotonic()
        r = client.post("/inference", content=raw, headers={"content-type": "application/json"})
        # json.loads hits its recursion limit; FastAPI answers 400 "There was an error parsing the body"
        assert r.status_code == 400 and time.monotonic() - t0 < 5
        check_error_shape(r)


def test_50mb_body_is_413(client):
    t0 = time.monotonic()
    r = client.post("/inference", content=b'{"prompt": "' + b"a" * (50 << 20) + b'"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:200]
    assert r.json()["error"] == "payload_too_large" and "larger than" in r.json()["message"]
    assert time.monotonic() - t0 < 20
    assert client.get("/health").status_code == 200


def test_50mb_chunked_body_is_413(client):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(50):
            yield b"a" * (1 << 20)
        yield b'"}'

    r = client.post("/inference", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:200]
    assert r.json()["error"] == "payload_too_large"


def test_oversize_image_is_413(client):
    big = base64.b64encode(b"\x00" * (21 << 20)).decode()  # 21 MB decoded, under the 32 MB body limit
    r = client.post("/inference", json=dict(SMALL, image=big))
    assert r.status_code == 413
    body = check_error_shape(r, "image")
    assert body["error"] == "payload_too_large" and "20 MB" in body["message"]


@pytest.mark.parametrize("make, why", [
    (lambda: (lambda b: b[:len(b) // 2])(base64.b64decode(png_b64(256, 256))), "truncated"),  # IDAT cut short
    (lambda: base64.b64decode(png_b64(64, 64))[:60], "truncated"),
    (lambda: _png(64, 64, b"definitely not zlib", bit_depth=8, color_type=2), "decoded"),
    (lambda: b"GIF89a" + b"\x00" * 64, "image is GIF; accepted formats are PNG, JPEG and WebP"),
], ids=["truncated-idat", "truncated-after-header", "corrupt-idat", "gif"])
def test_broken_images_are_422(client, make, why):
    r = client.post("/inference", json=dict(SMALL, image=base64.b64encode(make()).decode()))
    assert r.status_code == 422, r.text[:300]
    body = check_error_shape(r, "image")
    assert why in body["message"]
    assert " at 0x" not in body["message"]  # no Python object reprs reach the client


def test_line_wrapped_base64_is_accepted_as_decoders_accept_it(client):
    wrapped = base64.encodebytes(base64.b64decode(png_b64(256, 256))).decode()  # 76-column lines, as MIME
    assert "\n" in wrapped
    r = client.post("/inference", json=dict(SMALL, image=wrapped))
    assert r.status_code == 200, r.text[:300]


def test_an_rgba_input_says_its_alpha_was_dropped(client):
    buf = io.BytesIO()
    Image.new("RGBA", (256, 256), (200, 30, 30, 128)).save(buf, format="PNG")
    r = client.post("/inference", json=dict(SMALL, image=base64.b64encode(buf.getvalue()).decode()))
    assert r.status_code == 200, r.text[:300]
    assert any("alpha channel was dropped" in w for w in r.json()["warnings"])


def test_png_without_iend_trailer_is_accepted(client):
    """Pixel data complete, only the 12-byte IEND chunk missing: PIL decodes it, so the server accepts it (200)."""
    data = base64.b64decode(png_b64(64, 64))
    assert data.endswith(b"IEND\xaeB`\x82")
    r = client.post("/inference", json=dict(SMALL, image=base64.b64encode(data[:-12]).decode()))
    assert r.status_code == 200, r.text[:300]


@pytest.mark.parametrize("w, h, why", [(20000, 20000, "decompression bomb"), (8000, 8000, "8000x8000"),
                                       (16385, 16, "16385x16")])
def test_decompression_bomb_is_422(client, w, h, why):
    data = bomb_png(w, h)
    assert len(data) < 100_000  # tiny on the wire ...
    t0 = time.monotonic()
    r = client.post("/inference", json=dict(SMALL, image=base64.b64encode(data).decode()))
    assert r.status_code == 422
    assert time.monotonic() - t0 < 5  # ... and rejected from the header, before any pixel is decoded
    body = check_error_shape(r, "image")
    assert why in body["message"]


@pytest.mark.parametrize("w, h, fmt", [(1, 1, "PNG"), (10000, 10, "PNG"), (1, 1, "JPEG")])
def test_extreme_aspect_images_with_size(client, w, h, fmt):
    img = png_b64(w, h, fmt=fmt)
    for image in (img, f"data:image/{fmt.lower()};base64,{img}"):
        r = client.post("/inference", json=dict(SMALL, image=image))
        assert r.status_code == 200, r.text[:300]
        out = r.json()
        assert (out["width"], out["height"]) == (256, 256)
        assert decode_b64_image(out["images"][0]).size == (256, 256)


@pytest.mark.parametrize("w, h, expected", [(1, 1, (1024, 1024)), (10000, 10, (2048, 256))])
def test_extreme_aspect_images_default_size(client, w, h, expected):
    """Without width/height the output keeps the input's aspect at ~1 MP, snapped to 16 and clamped to 256..2048;
    when the limits cannot keep the aspect, the response says so."""
    from kontext_server.service.sizes import output_size

    size = output_size(None, None, Image.new("RGB", (w, h)))
    assert (size.width, size.height) == expected
    body = {k: v for k, v in SMALL.items() if k not in ("width", "height")}
    r = client.post("/inference", json=dict(body, image=png_b64(w, h)))
    assert r.status_code == 200, r.text[:300]
    out = r.json()
    assert (out["width"], out["height"]) == expected
    assert decode_b64_image(out["images"][0]).size == expected
    assert any(w.startswith("image: resized from") for w in out["warnings"])
    assert any("does not keep the aspect ratio" in w for w in out["warnings"]) == (w != h)


@pytest.mark.parametrize("prompt", ["一辆红色的汽车 🚗🚗", "سيارة حمراء", "e\u0301\u0301\u0301 zalgo",
                                    "\x00nul\x00",
                                    "🚗" * 1000, "x" * 4000])
def test_unicode_prompts_real_model(client, prompt):
    r = client.post("/inference", json=dict(SMALL, prompt=prompt))
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["images"]) == 1


def test_real_model_survives_the_hostile_inputs(client):
    assert client.get("/health").status_code == 200
    assert client.post("/inference", json=SMALL).status_code == 200


def test_benchmark_bad_params_real_model(client):
    for q in ("runs=0", "runs=abc", "width=300", "width=1e308", "steps=" + "9" * 40, "edit=maybe", "height=2064"):
        r = client.get("/benchmark?" + q)
        assert r.status_code == 422, (q, r.text)
        check_error_shape(r, q.split("=")[0])


def test_benchmark_valid_params_real_model(client):
    """A real (tiny) request benchmark: three rows with finite timings. Identical images (on CPU the '0' and
    'default' rows are bit-identical) must not produce an infinite PSNR, which JSON cannot carry (this was a 500
    until fidelity.psnr returned None for identical images)."""
    r = client.get("/benchmark", params={"runs": 1, "steps": 1, "width": 256, "height": 256})
    assert r.status_code == 200, r.text[:300]
    rows = r.json()["rows"]
    assert len(rows) == 3 and all(math.isfinite(row["timings_ms"]["total"]) for row in rows)
    for row in rows:
        psnr = (row.get("fidelity_vs_stage0") or {}).get("psnr_db")
        assert psnr is None or math.isfinite(psnr)
