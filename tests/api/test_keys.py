"""API keys (kontext_server/api/auth.py, the app's KeyGuard): the key file, which routes need a key and in which error
shape they refuse, both header styles, open probes, per-key metrics by key id, and a live server whose log never holds
a key. CPU, tiny model, 256-pixel sides and 1-2 steps."""
from __future__ import annotations

import hashlib

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from kontext_server.api.app import OPEN_PATHS, ServerSettings, create_app
from kontext_server.api.auth import KeyStore, exposure_warning, presented_key
from tests.helpers import LiveServer, png_b64

KEY_A = "sk-test-alpha-0123456789"
KEY_B = "sk-test-bravo-9876543210"  # stored as its hash
WRONG = "sk-test-wrong-5555555555"
SMALL = {"prompt": "a car", "width": 256, "height": 256, "steps": 1, "seed": 1}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_file_text() -> str:
    return f"# keys of the test\n\n{KEY_A}\n   \nsha256:{sha(KEY_B)}  \n# {WRONG} is commented out\n"


def png_file() -> bytes:
    import base64

    return base64.b64decode(png_b64())


# The routes a key protects: (method, path, request kwargs for httpx / TestClient, shape)
PROTECTED = [
    ("POST", "/inference", {"json": SMALL}, "inference"),
    ("GET", "/benchmark", {"params": {"runs": 1, "steps": 1}}, "inference"),
    ("POST", "/v1/images/generations", {"json": {"prompt": "a car", "size": "256x256", "steps": 1}}, "openai"),
    ("POST", "/v1/images/edits", {"files": {"image": ("in.png", png_file(), "image/png")},
                                  "data": {"prompt": "x", "size": "256x256", "steps": "1"}}, "openai"),
    ("GET", "/v1/models", {}, "openai"),
]


def assert_shape(r, shape: str, status: int):
    assert r.status_code == status, r.text[:300]
    body = r.json()
    if shape == "openai":
        assert set(body["error"]) == {"message", "type", "param", "code"}
    else:
        assert isinstance(body["error"], str) and body["message"]


# ---------------------------------------------------------------------------------------------------------------
# the key file and the headers
# ---------------------------------------------------------------------------------------------------------------
def test_the_key_file_takes_keys_and_hashes_and_skips_comments_and_blanks():
    store = KeyStore.from_lines(key_file_text().splitlines())
    assert len(store.digests) == 2
    assert store.identify(KEY_A) == sha(KEY_A)[:8]
    assert store.identify(KEY_B) == sha(KEY_B)[:8]
    assert store.identify(WRONG) is None and store.identify("") is None
    assert store.identify(KEY_A + " ") is None  # exact match only


@pytest.mark.parametrize("text, message", [("# only a comment\n\n", "no keys"),
                                           ("sha256:abc\n", "64 hex"), (f"sha256:{'g' * 64}\n", "64 hex")])
def test_a_bad_key_file_is_refused_at_start_up(tmp_path, text, message):
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        KeyStore.from_file(path)
    with pytest.raises(ValueError, match="cannot read"):
        KeyStore.from_file(tmp_path / "missing")


def test_a_missing_key_file_stops_the_cli_with_its_path(tmp_path, capsys):
    from kontext_server.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--api-keys", str(tmp_path / "nope")])
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("headers, key", [
    ([(b"authorization", b"Bearer abc")], "abc"), ([(b"authorization", b"bearer  abc ")], "abc"),
    ([(b"x-key", b"abc")], "abc"), ([(b"authorization", b"Basic abc"), (b"x-key", b"def")], "def"),
    ([(b"authorization", b"Bearer ")], None), ([], None)])
def test_a_key_is_read_from_a_bearer_token_or_x_key(headers, key):
    assert presented_key(headers) == key


def test_the_start_up_warns_only_without_keys_off_loopback():
    keys = KeyStore.from_lines([KEY_A])
    assert exposure_warning("0.0.0.0", None) and "without API keys" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("example.org", None)
    assert exposure_warning("0.0.0.0", keys) is None
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warning(host, None) is None


# ---------------------------------------------------------------------------------------------------------------
# the routes, in process
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(cache_dir):
    from kontext_server.service import FluxService, ServiceConfig

    svc = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations="auto", cache_dir=cache_dir))
    settings = ServerSettings(load_in_background=False, api_keys=KeyStore.from_lines(key_file_text().splitlines()))
    with TestClient(create_app(svc, settings)) as c:
        yield c


@pytest.mark.parametrize("method, path, kwargs, shape", PROTECTED, ids=[p[1] for p in PROTECTED])
def test_every_protected_route_refuses_a_missing_or_wrong_key_in_its_own_shape(keyed, method, path, kwargs, shape):
    for headers in ({}, {"Authorization": f"Bearer {WRONG}"}, {"x-key": WRONG}, {"Authorization": KEY_A}):
        r = keyed.request(method, path, headers=headers, **kwargs)
        assert_shape(r, shape, 401)
        assert r.headers["www-authenticate"] == "Bearer"
        assert KEY_A not in r.text and WRONG not in r.text


@pytest.mark.parametrize("method, path, kwargs, shape", PROTECTED, ids=[p[1] for p in PROTECTED])
def test_every_protected_route_accepts_both_header_styles(keyed, method, path, kwargs, shape):
    for headers in ({"Authorization": f"Bearer {KEY_A}"}, {"x-key": KEY_B}):
        r = keyed.request(method, path, headers=headers, **kwargs)
        assert r.status_code == 200, r.text[:300]


@pytest.mark.parametrize("path", ["/health", "/live", "/metrics", "/openapi.json", "/docs"])
def test_probes_scrapes_and_the_api_docs_need_no_key(keyed, path):
    assert path in OPEN_PATHS
    assert keyed.get(path).status_code == 200


@pytest.mark.parametrize("path", ["/ui", "/ui/playground.js", "/ui/playground.css"])
def test_the_playground_page_needs_no_key_but_the_api_it_calls_does(keyed, path):
    assert path in OPEN_PATHS
    r = keyed.get(path)
    assert r.status_code == 200 and r.content
    assert keyed.get("/", follow_redirects=False).headers["location"] == "/ui"
    assert keyed.post("/v1/images/generations", json={"prompt": "x"}).status_code == 401


def test_a_route_the_guard_does_not_know_is_guarded_too(keyed):
    assert_shape(keyed.get("/nothing-here"), "inference", 401)
    assert keyed.get("/nothing-here", headers={"x-key": KEY_A}).status_code == 404


def test_requests_are_counted_per_key_id_and_never_by_key(keyed):
    keyed.get("/v1/models", headers={"x-key": KEY_A})
    keyed.get("/v1/models", headers={"x-key": WRONG})
    text = keyed.get("/metrics").text
    assert f'flux_requests_by_key_total{{key_id="{sha(KEY_A)[:8]}",status="200"}}' in text
    assert 'flux_requests_by_key_total{key_id="invalid",status="401"}' in text
    assert KEY_A not in text and WRONG not in text and sha(KEY_A) not in text


def test_the_sdk_raises_authentication_error_for_a_wrong_or_missing_key(keyed):
    wrong = OpenAI(base_url="http://testserver/v1", api_key=WRONG, http_client=keyed, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.images.generate(prompt="x", size="256x256")
    assert info.value.code == "invalid_api_key" and info.value.message.endswith("invalid API key")
    missing = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=keyed, max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="missing API key"):
        missing.models.list(extra_headers={"Authorization": openai.Omit()})
    good = OpenAI(base_url="http://testserver/v1", api_key=KEY_A, http_client=keyed, max_retries=0)
    assert good.images.generate(prompt="x", size="256x256", extra_body={"steps": 1}).data[0].b64_json


def test_metrics_can_require_a_key(cache_dir):
    from kontext_server.service import FluxService, ServiceConfig

    svc = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations="none", cache_dir=cache_dir))
    settings = ServerSettings(api_keys=KeyStore.from_lines([KEY_A]), metrics_key_required=True)
    with TestClient(create_app(svc, settings)) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"x-key": KEY_A}).status_code == 200
        assert c.get("/live").status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# a live server: the key never reaches its log
# ---------------------------------------------------------------------------------------------------------------
def test_a_live_server_with_a_key_file_never_logs_a_key(cache_dir, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(key_file_text())
    with LiveServer(cache_dir, "--api-keys", str(keys)) as server, httpx.Client(timeout=120) as http:
        assert http.get(server.url + "/health").status_code == 200
        assert http.post(server.url + "/inference", json=SMALL).status_code == 401
        assert http.post(server.url + "/inference", json=SMALL, headers={"x-key": WRONG}).status_code == 401
        assert http.post(server.url + "/inference", json=SMALL, headers={"x-key": KEY_A}).status_code == 200
        sdk = OpenAI(base_url=server.url + "/v1", api_key=KEY_B, max_retries=0)
        events = list(sdk.images.generate(prompt="x", size="256x256", stream=True, partial_images=1,
                                          extra_body={"steps": 2, "seed": 1}))
        assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=server.url + "/v1", api_key=WRONG, max_retries=0).models.list()
        log = server.log()
    assert "outcome=200" in log and "API keys: 2 from" in log  # the log has the request lines to search
    for secret in (KEY_A, KEY_B, WRONG, sha(KEY_B)):
        assert secret not in log
