"""Per-key limits (kontext_server/api/rate_limit.py and the app's KeyGuard): the rule's syntax, the token bucket and
its Retry-After on a fake clock, concurrent jobs, thread safety, and 429s over HTTP in each route family's shape (the
SDK's RateLimitError). CPU; generation stubbed where a job must be held running."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from kontext_server.api.app import ServerSettings, create_app
from kontext_server.api.auth import KeyStore
from kontext_server.api.rate_limit import RateLimiter, RateRule

KEY_A, KEY_B = "key-a-1234567890", "key-b-0987654321"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# ---------------------------------------------------------------------------------------------------------------
# the rule and the limiter
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, rule", [("60/min,2", RateRule(60, 60.0, 2)), ("10/s", RateRule(10, 1.0)),
                                        (" 5 / hour , 1 ", RateRule(5, 3600.0, 1)), ("3/MINUTES", RateRule(3, 60.0))])
def test_a_rule_is_n_per_unit_with_optional_concurrency(spec, rule):
    assert RateRule.parse(spec) == rule


@pytest.mark.parametrize("spec", ["60", "60/fortnight", "0/min", "60/min,0", "60/min,2,3", "a/min", ""])
def test_a_bad_rule_is_refused_with_the_syntax(spec):
    with pytest.raises(ValueError, match="N/UNIT|at least 1"):
        RateRule.parse(spec)


def test_the_cli_parses_the_rule_and_refuses_a_bad_one(capsys):
    from kontext_server.cli import build_parser

    assert build_parser().parse_args(["serve", "--rate-limit", "6/min,1"]).rate_limit == RateRule(6, 60.0, 1)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--rate-limit", "six"])
    assert "N/UNIT" in capsys.readouterr().err


def test_the_n_plus_first_request_in_the_window_waits_for_the_bucket_to_refill():
    clock = Clock()
    limiter = RateLimiter(RateRule(3, 60.0), clock=clock)
    assert all(limiter.admit("a").ok for _ in range(3))
    refused = limiter.admit("a")
    assert not refused.ok and refused.retry_after_s == 20  # one request per 60 / 3 s once the burst is spent
    assert "3 requests per 60 s" in refused.reason
    assert limiter.admit("b").ok  # another key has its own bucket
    clock.now += 15
    assert limiter.admit("a").retry_after_s == 5
    clock.now += 5
    assert limiter.admit("a").ok and not limiter.admit("a").ok
    clock.now += 3600  # a long pause refills to the burst size, not beyond
    assert sum(limiter.admit("a").ok for _ in range(10)) == 3


def test_concurrent_jobs_are_limited_and_a_refused_job_costs_no_request():
    clock = Clock()
    limiter = RateLimiter(RateRule(5, 60.0, 2), clock=clock, job_retry_after=lambda: 7)
    assert limiter.admit("a", job=True).ok and limiter.admit("a", job=True).ok
    refused = limiter.admit("a", job=True)
    assert not refused.ok and refused.retry_after_s == 7 and "2 concurrent jobs" in refused.reason
    assert limiter.admit("a", job=False).ok  # a request that runs no job is not held back
    limiter.release("a")
    assert limiter.active("a") == 1
    assert limiter.admit("a", job=True).ok  # 4 of 5 requests used: the refused one was not counted
    assert limiter.admit("a").ok and not limiter.admit("a").ok


def test_the_limiter_admits_exactly_the_burst_from_many_threads():
    limiter = RateLimiter(RateRule(50, 3600.0))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: limiter.admit("a").ok, range(400)))
    assert sum(results) == 50


# ---------------------------------------------------------------------------------------------------------------
# over HTTP
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(cache_dir):
    from kontext_server.service import FluxService, ServiceConfig

    svc = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations="none", cache_dir=cache_dir))
    svc.load()
    return svc


def test_over_http_the_n_plus_first_request_is_429_with_the_rules_retry_after(service):
    settings = ServerSettings(load_in_background=False, api_keys=KeyStore.from_lines([KEY_A, KEY_B]),
                              rate_limit=RateRule(3, 60.0))
    with TestClient(create_app(service, settings)) as c:
        t0 = time.monotonic()
        for _ in range(3):
            assert c.get("/v1/models", headers={"x-key": KEY_A}).status_code == 200
        r = c.post("/inference", json={"prompt": "x"}, headers={"x-key": KEY_A})
        elapsed = time.monotonic() - t0
        assert r.status_code == 429 and r.json()["error"] == "rate_limit_exceeded"  # /inference's own shape
        assert 20 - elapsed - 1 <= int(r.headers["retry-after"]) <= 20
        sdk = OpenAI(base_url="http://testserver/v1", api_key=KEY_A, http_client=c, max_retries=0)
        with pytest.raises(openai.RateLimitError) as info:
            sdk.images.generate(prompt="x", size="256x256")
        assert info.value.code == "rate_limit_exceeded" and info.value.body["type"] == "rate_limit_error"
        assert 1 <= int(info.value.response.headers["retry-after"]) <= 20
        assert c.get("/v1/models", headers={"x-key": KEY_B}).status_code == 200  # the other key is not held back
        assert c.get("/health").status_code == 200  # probes are not limited
        metrics = c.get("/metrics").text
    assert 'flux_requests_by_key_total{key_id="' in metrics and 'status="429"} 2.0' in metrics


def test_without_keys_the_limit_is_shared_by_every_client(service):
    with TestClient(create_app(service, ServerSettings(load_in_background=False,
                                                       rate_limit=RateRule(2, 3600.0)))) as c:
        assert [c.get("/v1/models").status_code for _ in range(3)] == [200, 200, 429]
        assert 'key_id="anonymous",status="429"' in c.get("/metrics").text


def test_a_key_over_its_concurrent_jobs_gets_429_while_another_key_queues(service, monkeypatch):
    """A stubbed generation that waits for the test, so the key's one job is known to be running."""
    from kontext_server.service import GenerationResult

    release, started = threading.Event(), threading.Event()

    def held_generate(req, image=None, should_stop=None, output_type="pil", plan=None, on_step=None):
        started.set()
        release.wait(30)
        from PIL import Image

        return GenerationResult(images=[Image.new("RGB", (256, 256))], seed=1, width=256, height=256, steps=1,
                                steps_computed=1, steps_skipped=0, timings_ms={"total": 1.0},
                                optimizations=plan, warnings=[])

    monkeypatch.setattr(service, "generate", held_generate)
    settings = ServerSettings(load_in_background=False, api_keys=KeyStore.from_lines([KEY_A, KEY_B]),
                              rate_limit=RateRule(100, 60.0, 1))
    body = {"prompt": "x", "width": 256, "height": 256, "steps": 1}
    with TestClient(create_app(service, settings)) as c, ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.post, "/inference", json=body, headers={"x-key": KEY_A})
        assert started.wait(30)
        second = c.post("/v1/images/generations", json={"prompt": "x", "size": "256x256"}, headers={"x-key": KEY_A})
        assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limit_exceeded"
        assert "1 concurrent job" in second.json()["error"]["message"] and int(second.headers["retry-after"]) >= 1
        other = pool.submit(c.post, "/inference", json=body, headers={"x-key": KEY_B})  # queued behind the first
        time.sleep(0.3)
        release.set()
        assert first.result(30).status_code == 200 and other.result(30).status_code == 200
        assert c.post("/inference", json=body, headers={"x-key": KEY_A}).status_code == 200  # its slot came back
