"""Webhooks: a receiver on loopback (allowed by allow_private_urls) gets one signed delivery per finished job, sees
the retries when it first answers 500, and a failing webhook never changes the job's answer."""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler

import pytest

from kontext_server.jobstore.webhooks import SIGNATURE_HEADER, signature
from tests.jobs.support import FAST, app_client, http_server, poll, wait_for

SECRET = "whsec-test"


class Receiver:
    """Records every POST; answers the statuses in `script` in turn, then 200."""

    def __init__(self, script=()):
        self.script = list(script)
        self.calls: list[tuple[dict, bytes]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.script.pop(0) if receiver.script else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.handler = Handler


def verify(headers: dict, body: bytes, secret: str) -> bool:
    """What a receiver does (docs/api.md): recompute the HMAC of the raw body, compare in constant time."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers.get(SIGNATURE_HEADER.lower(), ""))


@pytest.fixture(scope="module")
def client(tiny_service):
    with app_client(tiny_service, allow_private_urls=True, webhook_retry_delays=(0.2, 0.2, 0.2),
                    webhook_timeout=2.0) as c:
        yield c


def test_each_finished_job_gets_exactly_one_signed_delivery_of_its_result(client):
    receiver = Receiver()
    with http_server(receiver.handler) as url:
        ids = [client.post("/v1/flux-kontext-dev", json={"prompt": "a car", "seed": n, **FAST,
                                                         "webhook_url": f"{url}/hook?token=abc",
                                                         "webhook_secret": SECRET}).json()["id"] for n in range(2)]
        answers = {i: poll(client, i)[0] for i in ids}
        wait_for(lambda: len(receiver.calls) >= 2)
        wait_for(lambda: all(client.get("/v1/get_result", params={"id": i}).json()["details"]["webhook"]["state"]
                             == "delivered" for i in ids))
    assert len(receiver.calls) == 2
    by_id = {h["x-webhook-id"]: (h, b) for h, b in receiver.calls}
    assert set(by_id) == set(ids)
    for job_id, (headers, body) in by_id.items():
        assert verify(headers, body, SECRET) and not verify(headers, body, "another secret")
        assert headers["x-webhook-attempt"] == "1" and headers["content-type"] == "application/json"
        delivered = json.loads(body)
        assert delivered["status"] == "Ready" and delivered["id"] == job_id
        assert delivered["result"]["seed"] == answers[job_id]["result"]["seed"]
        assert delivered["result"]["sample"].split("?")[0] == answers[job_id]["result"]["sample"].split("?")[0]


def test_a_receiver_that_first_answers_500_sees_the_retries_of_the_same_signed_body(client):
    receiver = Receiver(script=[500, 500])
    with http_server(receiver.handler) as url:
        job = client.post("/v1/flux-kontext-dev", json={"prompt": "a car", **FAST, "webhook_url": url,
                                                        "webhook_secret": SECRET}).json()["id"]
        wait_for(lambda: client.get("/v1/get_result", params={"id": job}).json()["details"].get("webhook", {})
                 .get("state") == "delivered", timeout=20)
    assert [h["x-webhook-attempt"] for h, _ in receiver.calls] == ["1", "2", "3"]
    assert len({b for _, b in receiver.calls}) == 1 and all(verify(h, b, SECRET) for h, b in receiver.calls)
    assert client.get("/v1/get_result", params={"id": job}).json()["details"]["webhook"]["attempts"] == 3
    metrics = client.get("/metrics").text
    assert 'flux_webhook_deliveries_total{outcome="retry"}' in metrics


def test_a_webhook_that_always_fails_is_given_up_and_the_job_stays_ready(client):
    receiver = Receiver(script=[503] * 10)
    with http_server(receiver.handler) as url:
        job = client.post("/v1/flux-kontext-dev", json={"prompt": "a car", **FAST, "webhook_url": url}).json()["id"]
        done, _ = poll(client, job)
        hook = wait_for(lambda: (lambda w: w if w.get("state") == "failed" else None)(
            client.get("/v1/get_result", params={"id": job}).json()["details"].get("webhook", {})), timeout=20)
    assert done["status"] == "Ready" and hook["attempts"] == 4 and "503" in hook["last_error"]
    assert len(receiver.calls) == 4 and SIGNATURE_HEADER.lower() not in receiver.calls[0][0]  # no secret: unsigned
    assert 'flux_webhook_deliveries_total{outcome="failed"}' in client.get("/metrics").text


def test_a_webhook_to_loopback_is_refused_without_allow_private_urls(tiny_service):
    receiver = Receiver()
    with app_client(tiny_service, webhook_retry_delays=()) as c, http_server(receiver.handler) as url:
        job = c.post("/v1/flux-kontext-dev", json={"prompt": "a car", **FAST, "webhook_url": url}).json()["id"]
        poll(c, job)
        hook = wait_for(lambda: (lambda w: w if w.get("state") == "failed" else None)(
            c.get("/v1/get_result", params={"id": job}).json()["details"].get("webhook", {})))
    assert "loopback" in hook["last_error"] and receiver.calls == []


def test_the_signature_is_sha256_hmac_of_the_raw_body_in_hex():
    assert signature("key", b"{}") == "sha256=" + hmac.new(b"key", b"{}", hashlib.sha256).hexdigest()
