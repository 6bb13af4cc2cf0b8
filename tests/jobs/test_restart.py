"""Durability: a server SIGKILLed with a job running and jobs pending, started again on the same data directory,
accounts for every job (the running one: Error "interrupted by restart"; the pending ones run), runs none twice (one
"job <id> started" line per job across both processes' logs) and delivers each job's webhook once. The
`--on-restart error` policy is checked on the manager in process (no third server start)."""
from __future__ import annotations

import json
import re
import time

import httpx

from kontext_server.jobstore.manager import JobManager, JobSpec, ManagerSettings
from kontext_server.jobstore.store import DataDirInUse, JobStore
from kontext_server.request import InferenceRequest
from tests.helpers import LiveServer, png_b64
from tests.jobs.support import http_server, wait_for
from tests.jobs.test_webhooks import Receiver

FAST = {"width": 256, "height": 256, "steps": 2, "output_format": "png"}


def result(http: httpx.Client, job_id: str) -> dict:
    return http.get("/v1/get_result", params={"id": job_id}).json()


def started_counts(*logs: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for text in logs:
        for job_id in re.findall(r"job (\S+) started", text):
            counts[job_id] = counts.get(job_id, 0) + 1
    return counts


def test_a_killed_server_comes_back_with_every_job_accounted_for_and_none_run_twice(cache_dir, tmp_path):
    data = str(tmp_path / "data")
    args = ("--data-dir", data, "--max-queue", "8", "--allow-private-urls", "--webhook-retry-delays", "0.2")
    receiver = Receiver()
    with http_server(receiver.handler) as hook:
        first = LiveServer(cache_dir, *args, env={"FLUX_LOG_LEVEL": "INFO"})
        try:
            first.wait_ready()
            with httpx.Client(base_url=first.url, timeout=60) as http:
                def submit(**fields):
                    r = http.post("/v1/flux-kontext-dev", json={"prompt": "a car", **fields,
                                                                "webhook_url": f"{hook}/h?token=QUERYTOKEN",
                                                                "webhook_secret": "whsec-NEVERLOGGED"})
                    assert r.status_code == 200, r.text
                    return r.json()["id"]

                running = submit(width=768, height=768, steps=100, output_format="png")  # seconds: still running
                pending = [submit(seed=1, **FAST), submit(seed=2, input_image=png_b64(256, 256), **FAST)]
                wait_for(lambda: (result(http, running)["progress"] or 0) > 0, timeout=60)
                assert all(result(http, j)["details"]["state"] == "queued" for j in pending)
            first.proc.kill()  # SIGKILL: no drain, no shutdown hook
            first.proc.wait(30)
        finally:
            first.stop()
        second = LiveServer(cache_dir, *args, env={"FLUX_LOG_LEVEL": "INFO"})
        try:
            second.wait_ready()
            with httpx.Client(base_url=second.url, timeout=60) as http:
                answers = {j: wait_for(lambda j=j: (lambda r: r if r["status"] != "Pending" else None)(
                    result(http, j)), timeout=60) for j in [running, *pending]}
                wait_for(lambda: len(receiver.calls) >= 3, timeout=20)
                time.sleep(0.5)  # any duplicate delivery would arrive now
        finally:
            second.stop()
        logs = (first.log_path.read_text(errors="replace"), second.log_path.read_text(errors="replace"))
    interrupted = answers[running]
    assert interrupted["status"] == "Error" and interrupted["details"]["error"] == "interrupted"
    assert "interrupted by restart" in interrupted["details"]["message"]
    assert all(answers[j]["status"] == "Ready" for j in pending), answers
    assert answers[pending[1]]["result"]["timings_ms"]["image_encode"] > 0  # the stored input image came back
    counts = started_counts(*logs)
    assert counts == {running: 1, pending[0]: 1, pending[1]: 1}, counts
    assert started_counts(logs[1]) == {pending[0]: 1, pending[1]: 1}
    assert not any("QUERYTOKEN" in log or "NEVERLOGGED" in log for log in logs)  # no secret reaches a log
    assert any("webhook job=" in log for log in logs)  # (the deliveries were logged, by their redacted URL)
    delivered = sorted((h["x-webhook-id"], json.loads(b)["status"]) for h, b in receiver.calls)
    assert delivered == sorted([(running, "Error"), (pending[0], "Ready"), (pending[1], "Ready")])


class _Engine:
    """Stands in for the engine: records what would be queued."""

    def __init__(self):
        self.queued = []

    def submit(self, payload, job_id=None, **kw):
        self.queued.append(job_id)
        raise AssertionError("nothing may be queued under --on-restart error")


def test_on_restart_error_marks_pending_and_running_jobs_interrupted_and_queues_none(tmp_path):
    store = JobStore.open(tmp_path)
    req = InferenceRequest(prompt="x", width=256, height=256, steps=2).model_dump(mode="json")
    for job_id in ("a", "b", "c"):
        store.insert(job_id, req, {}, None, None, None)
    assert store.mark_running("a")
    engine = _Engine()
    manager = JobManager(store, engine, None, None, ManagerSettings(on_restart="error"), describe=lambda row: {},
                         decode_input=lambda raw: None)
    assert manager.recover() == {"interrupted": 3, "requeued": 0, "failed": 0}
    rows = {j: store.get(j) for j in ("a", "b", "c")}
    assert {r.status for r in rows.values()} == {"error"} and engine.queued == []
    assert all("interrupted by restart" in r.error_message for r in rows.values())
    assert "it was running" in rows["a"].error_message and "it was waiting" in rows["b"].error_message
    assert manager.recover() == {"interrupted": 0, "requeued": 0, "failed": 0}  # a second recovery changes nothing
    store.close()


def test_a_second_server_on_the_same_data_directory_is_refused(tmp_path):
    store = JobStore.open(tmp_path)
    try:
        try:
            JobStore.open(tmp_path)
        except DataDirInUse as exc:
            assert "in use by another server" in str(exc)
        else:
            raise AssertionError("a second store opened the same data directory")
    finally:
        store.close()
    JobStore.open(tmp_path).close()  # free again once the first closed


def test_only_one_of_two_racing_final_states_wins(tmp_path):
    store = JobStore.open(tmp_path)
    store.insert("j", {"prompt": "x"}, {}, None, None, None)
    assert store.mark_running("j") and not store.mark_running("j")  # runs at most once
    assert store.finish("j", "error", expires_at=1e12, error_code="cancelled")
    assert not store.finish("j", "ready", expires_at=1e12, result={"seed": 1}, from_states=("running",))
    assert store.get("j").status == "error"
    store.close()


def test_jobspec_carries_the_request_the_service_runs():
    spec = JobSpec(id="x", request=InferenceRequest(prompt="p"))
    assert spec.meta == {} and spec.image is None
