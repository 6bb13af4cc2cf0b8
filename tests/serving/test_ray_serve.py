"""The server on Ray Serve, end to end: a local Ray cluster started here (2 CPUs, no GPU), two tiny-model replicas
behind the ingress, real HTTP through Serve's proxy.

Covers: /health's replica count; 30 concurrent requests all answered 200 by both replicas (the `replica` field and
X-Replica); the same bytes as the local server for the same seed and flags (text-to-image and edit); strict 422 and
validation errors from the ingress; GET /benchmark on a replica; /metrics labelled by replica; a client that goes away
cancels its generation on the replica; overload answered 429 with Retry-After and no other 5xx; one replica killed
mid-load: every request answered once (200, or 503 replica_lost with Retry-After), /health's count drops and
recovers with a new replica.

Ray starts once for the module (about 20 s with the replicas' loading) and is shut down after it. The parts that need
no cluster (retry rules, options, config files): test_ray_parts.py.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from types import SimpleNamespace

import httpx
import pytest
import ray
import torch
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from kontext_server.serving.ray_serve.app import build
from tests.helpers import free_port, png_b64

REPLICAS = 2
MAX_QUEUE = 30
BASE = dict(prompt="a red car on a mountain road", width=256, height=256, steps=1)


@pytest.fixture(scope="module")
def ray_app(cache_dir):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build({"model": "tiny", "device": "cpu", "optimizations": "auto", "cache_dir": str(cache_dir),
                         "replicas": REPLICAS, "replica_queue": 1, "max_queue": MAX_QUEUE, "queue_timeout": 60}),
                  name="flux", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=120) as client:
            wait_for(lambda: ready_count(client) == REPLICAS, 60, "both replicas ready at the ingress")
            yield SimpleNamespace(url=url, client=client)
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def ready_count(client: httpx.Client) -> int:
    r = client.get("/health")
    return r.json()["replicas"]["ready"] if r.status_code == 200 else 0


def burst(url: str, bodies: list[dict], during=None) -> list[tuple[int, httpx.Headers, dict]]:
    """All bodies POSTed to /inference at once (each with its own X-Request-ID); `during`, if given, runs beside."""
    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=120,
                                     limits=httpx.Limits(max_connections=len(bodies) + 4)) as ac:
            async def one(i, body):
                r = await ac.post("/inference", json=body, headers={"x-request-id": f"t{i:03d}"})
                return r.status_code, r.headers, r.json()

            tasks = [one(i, b) for i, b in enumerate(bodies)]
            if during is not None:
                tasks.append(asyncio.to_thread(during))
            out = await asyncio.gather(*tasks)
            return out[:len(bodies)]

    return asyncio.run(main())


def inference_counts(client: httpx.Client) -> Counter:
    """flux_requests_total of /inference by status, as the ingress counted them."""
    out = Counter()
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for s in fam.samples:
            if s.name == "flux_requests_total" and s.labels["endpoint"] == "/inference":
                out[int(s.labels["status"])] += int(s.value)
    return out


def check_one_answer(i: int, status: int, headers: httpx.Headers, body: dict) -> None:
    assert headers.get_list("x-request-id") == [f"t{i:03d}"], headers  # one header: the request's own
    if status == 200:
        assert body["request_id"] == f"t{i:03d}" and body["images"]
        assert body["replica"] and headers["x-replica"] == body["replica"]


# ---------------------------------------------------------------------------------------------------------------
def test_health_counts_the_ready_replicas(ray_app):
    r = ray_app.client.get("/health")
    body = r.json()
    assert r.status_code == 200 and body["status"] == "ready" and body["engine"] == "ray"
    assert body["replicas"] == {"ready": 2, "loading": 0, "failed": 0, "draining": 0, "total": 2}
    assert len(body["replica_states"]) == 2
    for state in body["replica_states"].values():
        assert state["status"] == "ready" and state["actor"].startswith("SERVE_REPLICA::flux#FluxModel#")
    assert body["model"]["source"] == "tiny" and "optimizations" in body  # the replica's own health fields
    assert body["queue_depth"] == 0 and body["in_flight"] == 0
    assert ray_app.client.get("/live").json() == {"status": "alive"}


def test_thirty_concurrent_requests_all_succeed_and_both_replicas_serve_some(ray_app):
    results = burst(ray_app.url, [dict(BASE, seed=i) for i in range(30)])
    assert [s for s, _, _ in results] == [200] * 30, [b for s, _, b in results if s != 200][:3]
    for i, (status, headers, body) in enumerate(results):
        check_one_answer(i, status, headers, body)
        assert body["seed"] == i
    served = Counter(body["replica"] for _, _, body in results)
    assert set(served) == set(ray_app.client.get("/health").json()["replica_states"]) and len(served) == 2, served


@pytest.mark.parametrize("edit", [0, 1, 2], ids=["text-to-image", "edit", "edit-two-references"])
def test_outputs_are_the_local_servers_bytes_for_the_same_seed_and_flags(ray_app, client, edit):
    body = dict(BASE, steps=2, seed=1234, use_first_block_cache=True, cache_threshold=0.2, use_dpm_solver=True)
    if edit == 1:
        body["image"] = png_b64(256, 256)
    elif edit == 2:  # several references cross to the replica as a list of images
        body["images"] = [png_b64(256, 256), png_b64(256, 256, color=(20, 160, 40))]
    # A CPU result depends on torch's thread count (MKL's and oneDNN's reductions split by thread), not on Ray: the
    # local server runs with the replicas' count (Ray sets OMP_NUM_THREADS to a replica's num_cpus).
    threads = {s["torch_threads"] for s in ray_app.client.get("/health").json()["replica_states"].values()}
    assert len(threads) == 1
    own = torch.get_num_threads()
    torch.set_num_threads(threads.pop())
    try:
        local = client.post("/inference", json=body)
    finally:
        torch.set_num_threads(own)
    remote = ray_app.client.post("/inference", json=body)
    assert local.status_code == 200 and remote.status_code == 200, remote.text[:500]
    lj, rj = local.json(), remote.json()
    assert rj["images"] == lj["images"]  # byte-identical PNGs
    for key in ("seed", "width", "height", "steps", "steps_computed", "steps_skipped", "optimizations", "model",
                "warnings", "output_format", "references"):
        assert rj[key] == lj[key], key
    assert set(rj["timings_ms"]) == set(lj["timings_ms"])
    assert lj["replica"] is None and "x-replica" not in local.headers and rj["replica"]


def test_a_stream_through_the_replicas_sends_its_previews_then_the_local_servers_image(ray_app, client):
    """The step hook does not cross processes: the replica streams each step's event back and the ingress replays it,
    so a streamed request's partial images arrive as from the local server."""
    from openai import OpenAI

    sdk = OpenAI(base_url=ray_app.url + "/v1", api_key="unused", timeout=120, max_retries=0)
    events = list(sdk.images.generate(prompt="a car", size="256x256", stream=True, partial_images=2,
                                      extra_body={"steps": 4, "seed": 9}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert len({e.b64_json for e in events}) == 3  # two different stages of the denoising, then the image
    threads = {s["torch_threads"] for s in ray_app.client.get("/health").json()["replica_states"].values()}
    own = torch.get_num_threads()
    torch.set_num_threads(threads.pop())
    try:
        local = client.post("/v1/images/generations", json={"prompt": "a car", "size": "256x256", "steps": 4,
                                                             "seed": 9})
    finally:
        torch.set_num_threads(own)
    assert local.status_code == 200 and local.json()["data"][0]["b64_json"] == events[-1].b64_json


def test_an_async_job_runs_on_a_replica_with_progress_and_a_running_one_cancels_there(ray_app):
    """The job store lives on the ingress; the generation runs on a replica, which streams its steps back (progress)
    and is stopped there when the job is cancelled."""
    from tests.jobs.support import FAST, poll

    client = ray_app.client
    r = client.post("/v1/flux-kontext-dev", json={"prompt": "a red car", "seed": 7, **FAST})
    assert r.status_code == 200, r.text
    done, progress = poll(client, r.json()["id"], timeout=120)
    assert done["status"] == "Ready" and done["progress"] == 1.0 and progress == sorted(progress)
    sample = client.get(done["result"]["sample"])
    assert sample.status_code == 200 and sample.headers["content-type"] == "image/png"
    done_before = settled_generations(client)
    slow = client.post("/v1/flux-kontext-dev", json={"prompt": "a red car", "seed": 1, "width": 512, "height": 512,
                                                       "steps": 100}).json()["id"]
    wait_for(lambda: (client.get("/v1/get_result", params={"id": slow}).json()["progress"] or 0) > 0, 60,
             "the slow job's first step")
    assert client.delete(f"/v1/jobs/{slow}").json()["status"] == "cancelling"
    stopped, _ = poll(client, slow, timeout=60)
    assert stopped["status"] == "Error" and stopped["details"]["error"] == "cancelled"
    assert settled_generations(client) == done_before  # the replica stopped it: no generation finished


def test_errors_are_the_local_servers(ray_app, client):
    for body in ({"prompt": "x", "width": 100}, dict(BASE, use_compile=True, strict=True)):
        local, remote = client.post("/inference", json=body), ray_app.client.post("/inference", json=body)
        assert remote.status_code == local.status_code == 422
        assert remote.json() == local.json()
    assert ray_app.client.get("/nowhere").status_code == 404


def test_the_benchmark_route_runs_on_a_replica(ray_app):
    r = ray_app.client.get("/benchmark", params={"runs": 1, "steps": 1})
    assert r.status_code == 200, r.text[:500]
    body = r.json()
    assert body["replica"] in ray_app.client.get("/health").json()["replica_states"] and body["rows"]


def test_metrics_aggregate_ours_across_replicas_labelled_by_replica(ray_app):
    ids = set(ray_app.client.get("/health").json()["replica_states"])
    time.sleep(1.5)  # one heartbeat: each replica's last report holds the requests above
    families = list(text_string_to_metric_families(ray_app.client.get("/metrics").text))
    names = [f.name for f in families]
    assert len(names) == len(set(names))  # each family once
    by = {f.name: f for f in families}
    stage_counts = {s.labels["replica"]: s.value for s in by["flux_stage_seconds"].samples
                    if s.name == "flux_stage_seconds_count" and s.labels["stage"] == "total"}
    assert set(stage_counts) == ids and all(v > 0 for v in stage_counts.values())
    assert {s.labels["replica"] for s in by["flux_ready"].samples} == ids
    ready = [s.value for s in by["flux_replicas"].samples if s.labels["state"] == "ready"]
    assert ready == [2.0]
    assert any(s.labels.get("endpoint") == "/inference" for s in by["flux_requests"].samples)


def completed_generations(client: httpx.Client) -> float:
    """Generations the replicas finished, from their last reports (flux_stage_seconds' count of `total`)."""
    return sum(s.value for fam in text_string_to_metric_families(client.get("/metrics").text)
               for s in fam.samples if s.name == "flux_stage_seconds_count" and s.labels.get("stage") == "total")


def settled_generations(client: httpx.Client) -> float:
    """completed_generations once two reads a few heartbeats apart agree (reports lag the work by a heartbeat or
    two, more on a loaded machine)."""
    last = completed_generations(client)
    for _ in range(30):
        time.sleep(2.0)
        now = completed_generations(client)
        if now == last:
            return now
        last = now
    raise AssertionError("the replicas' reported generations never settled")


def test_a_client_that_goes_away_cancels_its_generation_on_the_replica(ray_app):
    client = ray_app.client
    done_before, gone_before = settled_generations(client), inference_counts(client)[499]
    # 512x512 at 50 steps takes seconds on the tiny model (256x256 at 40 steps took 0.53 s on an idle machine: it
    # ended before the cancel reached it); the client leaves after 0.5 s
    with pytest.raises(httpx.TimeoutException):
        httpx.post(ray_app.url + "/inference", json=dict(BASE, width=512, height=512, steps=50, seed=5), timeout=0.5)

    def idle():
        h = client.get("/health").json()
        return h["in_flight"] == 0 and h["queue_depth"] == 0 and \
            all(s["in_flight"] == 0 and s["report_age_s"] < 1.0 for s in h["replica_states"].values())

    time.sleep(1.0)
    wait_for(idle, 60, "the replicas idle again")
    assert settled_generations(client) == done_before  # stopped at a step, never finished
    assert inference_counts(client)[499] == gone_before + 1


def test_overload_is_429_with_retry_after_never_another_5xx(ray_app):
    # Every replica slot is first taken by a long generation (a running one and a held one per replica: Ray's router
    # may put two on one replica), so the burst meets a full house whatever the machine's speed (a burst of 1-step
    # requests alone was drained as fast as a loaded CI machine sent it: no 429). The holders are let go (their
    # clients leave, which stops their generations) once the burst's answers stop coming: what is left was queued
    # and runs after them.
    n = 2 * (REPLICAS * 2 + MAX_QUEUE) + 10  # twice what the replicas and the shared queue hold
    hold = dict(BASE, width=1024, height=1024, steps=100, seed=99)  # tens of seconds on the tiny model here

    async def main():
        async with httpx.AsyncClient(base_url=ray_app.url, timeout=120,
                                     limits=httpx.Limits(max_connections=n + 8)) as ac:
            holders = [asyncio.create_task(ac.post("/inference", json=hold)) for _ in range(2 * REPLICAS)]
            deadline = time.monotonic() + 60
            while (await ac.get("/health")).json()["in_flight"] < REPLICAS:
                assert time.monotonic() < deadline, "the holders never started on both replicas"
                await asyncio.sleep(0.1)

            async def one(i, body):
                r = await ac.post("/inference", json=body, headers={"x-request-id": f"t{i:03d}"})
                return r.status_code, r.headers, r.json()

            tasks = [asyncio.create_task(one(i, dict(BASE, seed=i))) for i in range(n)]
            answered, deadline = -1, time.monotonic() + 60
            while time.monotonic() < deadline:  # until the answers that do not wait stop coming
                await asyncio.sleep(1.0)
                now = sum(t.done() for t in tasks)
                if now == answered:
                    break
                answered = now
            assert not any(h.done() for h in holders), "a holder ended while the burst was answered"
            for h in holders:
                h.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
            return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    statuses = Counter(s for s, _, _ in results)
    assert set(statuses) <= {200, 429}, statuses
    # at least all that found no room (the holders took some)
    assert statuses[429] >= n - (REPLICAS * 2 + MAX_QUEUE), statuses
    assert statuses[200] >= MAX_QUEUE // 2, statuses  # what was queued is served once the replicas are free
    for i, (status, headers, body) in enumerate(results):
        check_one_answer(i, status, headers, body)
        if status == 429:
            assert body["error"] == "queue_full" and int(headers["retry-after"]) >= 1
    assert ray_app.client.get("/health").status_code == 200


def test_a_replica_killed_mid_load_every_request_answered_once_and_the_replica_comes_back(ray_app):
    client = ray_app.client
    before = client.get("/health").json()["replica_states"]
    victim_id, victim = sorted(before.items())[0]
    counts_before = inference_counts(client)
    timeline: list[tuple[float, int, tuple]] = []
    killed_at = {}

    def poll_health():
        with httpx.Client(base_url=ray_app.url, timeout=10) as c:
            while "done" not in killed_at:
                r = c.get("/health")
                j = r.json()
                timeline.append((time.monotonic(), j.get("replicas", {}).get("ready", 0),
                                 tuple(sorted(j.get("replica_states", {})))))
                time.sleep(0.2)

    def kill_when_busy():
        # The ingress's own count (no heartbeat's lag): two started means each replica runs one, the victim too
        wait_for(lambda: client.get("/health").json()["in_flight"] >= 2, 30, "both replicas running a request")
        ray.kill(ray.get_actor(victim["actor"], namespace="serve"), no_restart=True)
        killed_at["t"] = time.monotonic()

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    try:
        results = burst(ray_app.url, [dict(BASE, steps=2, seed=i) for i in range(30)], during=kill_when_busy)
        # Ray restarts the replica: the count drops to 1 and comes back to 2, with a new replica in the victim's place
        wait_for(lambda: timeline and timeline[-1][1] == 2 and victim_id not in timeline[-1][2], 120,
                 "a new replica in the killed one's place")
    finally:
        killed_at["done"] = True
        poller.join(15)

    statuses = Counter(s for s, _, _ in results)
    assert set(statuses) <= {200, 503} and statuses[200] > 0, statuses
    for i, (status, headers, body) in enumerate(results):
        check_one_answer(i, status, headers, body)
        if status == 503:
            assert body["error"] == "replica_lost" and int(headers["retry-after"]) >= 1, body
    after_kill = [n for t, n, _ in timeline if t >= killed_at["t"]]
    assert 1 in after_kill, timeline[-20:]  # the drop was visible
    final = client.get("/health").json()
    assert final["replicas"]["ready"] == 2 and victim_id not in final["replica_states"]
    # The ingress counted exactly the answers the clients got: nothing lost, nothing answered twice.
    delta = inference_counts(client) - counts_before
    assert delta == statuses, (delta, statuses)
