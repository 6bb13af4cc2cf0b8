"""Image URLs as inputs (/inference's `image`, BFL's `input_image`): an image host on loopback serves a good image,
a 25 MB body, a slow body, a redirect loop, a redirect to a private address and a non-image; each gets its documented
answer. The address rules are checked as a unit with a fake resolver, and end to end with private addresses refused."""
from __future__ import annotations

import base64
import time
from http.server import BaseHTTPRequestHandler

import pytest

from kontext_server import safe_http
from kontext_server.safe_http import FetchError, FetchPolicy, pick_address
from tests.helpers import png_b64
from tests.jobs.support import FAST, app_client, http_server, poll

GOOD = base64.b64decode(png_b64(256, 256))
BIG = 25 * 1024 * 1024


class ImageHost(BaseHTTPRequestHandler):
    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/good.png":
            return self._send(200, GOOD, "image/png")
        if path == "/big":  # no Content-Length: the limit must hold while streaming
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.end_headers()
            chunk = b"\0" * 65536
            try:
                for _ in range(BIG // len(chunk)):
                    self.wfile.write(chunk)
            except OSError:
                pass
            return None
        if path == "/big-declared":
            self.send_response(200)
            self.send_header("content-length", str(BIG))
            self.end_headers()
            return None
        if path == "/slow":
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.end_headers()
            try:
                for _ in range(40):
                    self.wfile.write(GOOD[:1])
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
            return None
        if path == "/loop":
            return self._redirect("/loop")
        if path == "/to-private":
            return self._redirect("http://internal.test/secret.png")
        if path == "/text":
            return self._send(200, b"hello, not an image", "text/plain")
        return self._send(404, b"not found", "text/plain")

    def _send(self, status, body, ctype):
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("location", location)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def host():
    with http_server(ImageHost) as url:
        yield url


@pytest.fixture(scope="module")
def client(tiny_service):
    with app_client(tiny_service, allow_private_urls=True, url_fetch_timeout=1.0) as c:
        yield c


def inference(client, image):
    return client.post("/inference", json={"prompt": "make it blue", "image": image, **FAST})


def test_a_good_image_url_is_fetched_for_inference_and_for_a_bfl_job(client, host):
    r = inference(client, f"{host}/good.png")
    assert r.status_code == 200, r.text
    job = client.post("/v1/flux-kontext-dev", json={"prompt": "make it blue", "input_image": f"{host}/good.png",
                                                    **FAST}).json()["id"]
    done, _ = poll(client, job)
    assert done["status"] == "Ready" and done["result"]["timings_ms"]["image_encode"] > 0  # an edit


@pytest.mark.parametrize("path, status, words", [
    ("/big", 413, "larger than the 20 MB limit"),
    ("/big-declared", 413, "larger than the 20 MB limit"),
    ("/slow", 422, "took longer than 1 s"),
    ("/loop", 422, "more than 3 redirects"),
    ("/text", 422, "could not be decoded as PNG, JPEG or WebP"),
    ("/missing", 422, "answered HTTP 404"),
])
def test_a_bad_image_url_gets_its_documented_answer_naming_the_field(client, host, path, status, words):
    t0 = time.monotonic()
    r = inference(client, f"{host}{path}?sig=s3cret")
    assert r.status_code == status, r.text
    body = r.json()
    assert body["detail"][0]["field"] == "image" and words in body["message"], body
    assert "s3cret" not in r.text  # the query string (it may be a credential) is not echoed
    assert time.monotonic() - t0 < 10
    bfl = client.post("/v1/flux-kontext-dev", json={"prompt": "x", "input_image": f"{host}{path}", **FAST})
    assert bfl.status_code == status
    detail = bfl.json()["detail"]
    assert (detail[0]["loc"][-1] == "input_image" and words in detail[0]["msg"]) if status == 422 else \
        detail.startswith("input_image:") and words in detail


def test_a_loopback_url_is_refused_when_private_addresses_are_not_allowed(tiny_service, host):
    with app_client(tiny_service) as c:
        r = inference(c, f"{host}/good.png")
        assert r.status_code == 422 and "a loopback address: refused" in r.json()["message"]
        r = c.post("/v1/flux-kontext-dev", json={"prompt": "x", "input_image": f"{host}/good.png", **FAST})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "input_image"]


def test_a_redirect_to_a_private_address_is_checked_again_and_refused(host):
    def resolver(name, port):
        return {"127.0.0.1": ["127.0.0.1"], "internal.test": ["10.20.30.40"]}[name]

    policy = FetchPolicy(trusted=("127.0.0.1/32",), timeout=5)  # the image host itself is trusted; nothing else
    assert safe_http.fetch(f"{host}/good.png", policy, resolver) == GOOD
    with pytest.raises(FetchError, match="internal.test' resolves to 10.20.30.40, a private address"):
        safe_http.fetch(f"{host}/to-private", policy, resolver)


@pytest.mark.parametrize("address, reason", [
    ("10.0.0.5", "private"), ("192.168.1.1", "private"), ("127.0.0.1", "loopback"), ("::1", "loopback"),
    ("169.254.169.254", "metadata"), ("169.254.1.1", "link-local"), ("fd00::1", "private"), ("fe80::1", "link-local"),
    ("::ffff:127.0.0.1", "loopback"), ("0.0.0.0", "unspecified"), ("100.64.0.1", "not a global"),
    ("224.0.0.1", "multicast"),
])
def test_private_loopback_link_local_and_metadata_addresses_are_refused_after_resolution(address, reason):
    with pytest.raises(FetchError, match=reason):
        pick_address("images.example", 443, FetchPolicy(), lambda h, p: [address])
    assert pick_address("images.example", 443, FetchPolicy(allow_private=True), lambda h, p: [address]) == address


def test_a_name_resolving_to_a_public_and_a_private_address_is_refused_and_a_public_one_accepted():
    with pytest.raises(FetchError, match="10.0.0.1"):
        pick_address("rebind.example", 80, FetchPolicy(), lambda h, p: ["93.184.216.34", "10.0.0.1"])
    assert pick_address("ok.example", 80, FetchPolicy(), lambda h, p: ["93.184.216.34"]) == "93.184.216.34"


@pytest.mark.parametrize("url, words", [
    ("ftp://example.com/a.png", "only http and https"), ("http:///a.png", "no host"),
    ("http://user:pw@example.com/a.png", "credentials"), ("http://example.com/" + "a" * 2100, "longer than 2048"),
])
def test_urls_that_are_not_plain_http_or_https_are_refused_before_any_connection(url, words):
    with pytest.raises(FetchError, match=words):
        safe_http.fetch(url, FetchPolicy(allow_private=True), lambda h, p: pytest.fail("resolved"))


def test_redact_drops_the_query_string_and_user_info():
    assert safe_http.redact("https://u:p@img.example:8443/a/b.png?X-Amz-Signature=abc#f") == \
        "https://img.example:8443/a/b.png"
