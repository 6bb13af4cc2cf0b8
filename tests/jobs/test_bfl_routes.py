"""The BFL-shaped asynchronous routes in process, on the tiny model: submit, poll, the sample's bytes, cancel,
validation, the queue's 429, keys through x-key, and expiry. 256x256 and 2 steps unless a test needs a slow job."""
from __future__ import annotations

import base64
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from kontext_server.api.auth import KeyStore
from kontext_server.api.bfl.protocol import aspect_size
from tests.helpers import png_b64
from tests.jobs.support import FAST, app_client, poll, wait_for

SLOW = {"width": 512, "height": 512, "steps": 100, "output_format": "png"}  # seconds on the tiny model: cancellable


@pytest.fixture(scope="module")
def service(tiny_service):
    return tiny_service


@pytest.fixture(scope="module")
def client(service):
    with app_client(service, max_queue=8) as c:
        yield c


def submit(client, **fields):
    r = client.post("/v1/flux-kontext-dev", json={"prompt": "a red car", **fields})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_job_runs_to_ready_with_rising_progress_and_its_sample_equals_the_synchronous_image(client):
    answer = submit(client, seed=7, **FAST)
    assert set(answer) == {"id", "polling_url"}
    assert answer["polling_url"].endswith(f"/v1/get_result?id={answer['id']}")
    done, progress = poll(client, answer["id"])
    assert done["status"] == "Ready" and done["progress"] == 1.0
    assert progress == sorted(progress) and all(0.0 <= p <= 1.0 for p in progress)
    result = done["result"]
    assert (result["seed"], result["prompt"], result["width"], result["height"]) == (7, "a red car", 256, 256)
    assert result["end_time"] >= result["start_time"] and result["duration"] >= 0
    assert result["timings_ms"]["transformer"] > 0 and "dpm_solver" in result["optimizations"]
    assert done["details"]["safety_tolerance"] == 2 and done["details"]["moderation"].startswith("none")
    sample = client.get(result["sample"])
    assert sample.status_code == 200 and sample.headers["content-type"] == "image/png"
    sync = client.post("/inference", json={"prompt": "a red car", "seed": 7, **FAST}).json()
    assert base64.b64decode(sync["images"][0]) == sample.content


def test_an_edit_from_a_base64_input_matches_the_input_aspect_ratio_by_default(client):
    answer = submit(client, input_image=png_b64(512, 256), steps=1, output_format="jpeg")
    done, _ = poll(client, answer["id"])
    assert done["status"] == "Ready"
    assert done["result"]["width"] / done["result"]["height"] == pytest.approx(2.0, rel=0.02)
    assert client.get(done["result"]["sample"]).headers["content-type"] == "image/jpeg"


def test_get_result_of_an_unknown_id_answers_task_not_found(client):
    r = client.get("/v1/get_result", params={"id": "no-such-job"})
    assert r.status_code == 200
    assert r.json() == {"id": "no-such-job", "status": "Task not found", "progress": None, "result": None,
                        "details": None}


def test_a_pending_job_cancelled_never_runs_and_a_running_one_stops_at_its_next_step(client):
    running = submit(client, seed=1, **SLOW)["id"]
    waiting = submit(client, seed=2, **FAST)["id"]
    # the running job's progress before the cancel (an Error answer carries none: the poll below may see none)
    seen = []

    def started():
        seen.append(client.get("/v1/get_result", params={"id": running}).json()["progress"] or 0)
        return seen[-1] > 0

    wait_for(started)
    r = client.delete(f"/v1/jobs/{waiting}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = client.delete(f"/v1/jobs/{running}")
    assert r.status_code == 200 and r.json()["status"] == "cancelling"
    stopped, progress = poll(client, running)
    assert stopped["status"] == "Error" and stopped["details"]["error"] == "cancelled"
    assert "while running" in stopped["details"]["message"] and max(seen + progress) < 1.0
    never, _ = poll(client, waiting)
    assert never["status"] == "Error" and never["details"]["error"] == "cancelled"
    assert "before it started" in never["details"]["message"]
    store = client.app.state.server.jobs.store
    assert store.get(waiting).started_at is None  # it never ran
    assert client.delete(f"/v1/jobs/{waiting}").status_code == 409
    assert client.delete("/v1/jobs/no-such-job").json() == {"detail": "no job 'no-such-job' (never submitted, "
                                                                      "or its result expired)"}


def test_a_poll_that_races_the_jobs_finish_never_sees_its_progress_fall_back(client, monkeypatch):
    """The job's finish lands between get_result's two reads: its row still `running`, its progress already dropped
    (as the finisher drops it once the answer is stored). The poll still reports the progress it had, not 0."""
    jobs = client.app.state.server.jobs
    job_id = submit(client, seed=3, **SLOW)["id"]
    before = wait_for(lambda: jobs.progress.get(job_id), 60)  # a step done: progress > 0
    read_row = jobs.store.get

    def row_then_finish(jid):
        row = read_row(jid)
        jobs.progress.pop(jid, None)
        return row

    monkeypatch.setattr(jobs.store, "get", row_then_finish)
    body = client.get("/v1/get_result", params={"id": job_id}).json()
    monkeypatch.undo()
    assert body["status"] == "Pending" and body["progress"] >= before > 0
    client.delete(f"/v1/jobs/{job_id}")
    assert poll(client, job_id)[0]["status"] == "Error"


@pytest.mark.parametrize("fields, field, words", [
    ({"prompt_upsampling": True}, "prompt_upsampling", "does not run"),
    ({"aspect_ratio": "22:9"}, "aspect_ratio", "between 21:9 and 9:21"),
    ({"aspect_ratio": "wide"}, "aspect_ratio", "W:H"),
    ({"safety_tolerance": 7}, "safety_tolerance", "less than or equal to 6"),
    ({"output_format": "webp"}, "output_format", "'jpeg' or 'png'"),
    ({"webhook_url": "ftp://example.com/hook"}, "webhook_url", "http or https"),
    ({"webhook_url": "https://example.com/" + "a" * 2100}, "webhook_url", "2048"),
    ({"input_image": "not base64!"}, "input_image", "not valid base64"),
    ({"steps": 0}, "steps", "greater than or equal to 1"),
    ({"guidance_scale": 3}, "guidance_scale", "Extra inputs"),
])
def test_bad_fields_are_a_422_in_bfls_shape_naming_the_field(client, fields, field, words):
    r = client.post("/v1/flux-kontext-dev", json={"prompt": "x", **fields})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(e["loc"][-1] == field and words in e["msg"] for e in detail), detail


def test_aspect_ratios_become_about_one_megapixel_in_multiples_of_16():
    assert aspect_size("1:1") == (1024, 1024)
    w, h = aspect_size("21:9")
    assert w % 16 == 0 and h % 16 == 0 and w / h == pytest.approx(21 / 9, rel=0.02)
    assert 0.94e6 < w * h < 1.06e6  # about a megapixel: each side is rounded to a multiple of 16
    assert aspect_size("9:21") == (h, w)


def test_a_full_queue_answers_429_with_retry_after_and_keeps_no_job(service):
    with app_client(service, max_queue=1) as c:
        first = submit(c, **SLOW)["id"]
        wait_for(lambda: c.get("/v1/get_result", params={"id": first}).json()["details"]["state"] == "running")
        submit(c, **FAST)
        r = c.post("/v1/flux-kontext-dev", json={"prompt": "x", **FAST})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "queue is full" in r.json()["detail"]
        assert c.app.state.server.jobs.store.counts_by_status() == {"running": 1, "pending": 1}
        c.delete(f"/v1/jobs/{first}")


def test_bfl_clients_x_key_header_is_an_api_key(service):
    keys = KeyStore.from_lines(["secret-key"])
    with app_client(service, api_keys=keys) as c:
        r = c.post("/v1/flux-kontext-dev", json={"prompt": "x", **FAST})
        assert r.status_code == 401 and "x-key" in r.json()["detail"]
        r = c.post("/v1/flux-kontext-dev", json={"prompt": "x", **FAST}, headers={"x-key": "secret-key"})
        assert r.status_code == 200
        done, _ = poll(_Keyed(c), r.json()["id"])
        assert done["status"] == "Ready"
        sample = c.get(done["result"]["sample"])  # signed URLs need no key
        assert sample.status_code == 200


class _Keyed:
    def __init__(self, client):
        self.client = client

    def get(self, *a, **kw):
        return self.client.get(*a, headers={"x-key": "secret-key"}, **kw)


def test_signed_urls_refuse_a_tampered_signature_an_other_file_and_an_expiry_in_the_past(client):
    done, _ = poll(client, submit(client, **FAST)["id"])
    url = done["result"]["sample"]
    parts = urlsplit(url)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert int(q["expires"]) == int(done["result"]["expires_at"])
    path = parts.path
    flipped = q["sig"][:-1] + ("0" if q["sig"][-1] != "0" else "1")
    assert client.get(f"{path}?expires={q['expires']}&sig={flipped}").status_code == 403
    assert client.get(f"{path}?expires={int(q['expires']) + 60}&sig={q['sig']}").status_code == 403
    assert client.get(path).status_code == 403
    signer = client.app.state.server.output_store.signer
    past = int(time.time()) - 1
    key = path.rsplit("/", 1)[1]
    r = client.get(f"{path}?expires={past}&sig={signer.sign(key, past)}")  # a genuine signature, expired
    assert r.status_code == 403 and r.json() == {"detail": "the URL's signature is invalid or has expired"}
    assert client.get(url).status_code == 200


def test_results_and_their_files_are_deleted_after_the_ttl(service):
    with app_client(service, result_ttl=3.0, sweep_interval=0.2) as c:  # 3 s: room for a loaded machine
        job = submit(c, **FAST)["id"]
        done, _ = poll(c, job)
        store = c.app.state.server.output_store
        assert store.count() == 1 and c.get(done["result"]["sample"]).status_code == 200
        wait_for(lambda: c.get("/v1/get_result", params={"id": job}).json()["status"] == "Task not found",
                 timeout=15)
        assert store.count() == 0
        assert c.get(done["result"]["sample"]).status_code in (403, 404)
        assert c.app.state.server.jobs.store.counts_by_status() == {}


def test_metrics_count_jobs_by_status_and_their_age(client):
    poll(client, submit(client, **FAST)["id"])
    text = client.get("/metrics").text
    assert 'flux_jobs{status="ready"}' in text and "flux_job_queue_depth 0.0" in text
    assert 'flux_jobs_finished_total{status="ready"}' in text and "flux_job_age_seconds_count" in text
    assert 'flux_jobs_submitted_total{outcome="accepted"}' in text


def test_polling_is_not_counted_against_the_rate_limit_but_submits_are(service):
    from kontext_server.api.rate_limit import RateRule

    with app_client(service, rate_limit=RateRule.parse("2/min")) as c:
        first = submit(c, **FAST)["id"]
        for _ in range(5):
            assert c.get("/v1/get_result", params={"id": first}).status_code == 200
        submit(c, **FAST)
        r = c.post("/v1/flux-kontext-dev", json={"prompt": "x", **FAST})
        assert r.status_code == 429 and "retry-after" in r.headers and "detail" in r.json()
        poll(c, first)


def test_input_image_2_adds_a_reference_and_needs_input_image_first(client):
    first, second = png_b64(256, 256), png_b64(256, 256, color=(20, 160, 40))
    one, _ = poll(client, submit(client, seed=3, input_image=first, **FAST)["id"])
    two, _ = poll(client, submit(client, seed=3, input_image=first, input_image_2=second, **FAST)["id"])
    assert one["status"] == two["status"] == "Ready"
    assert client.get(one["result"]["sample"]).content != client.get(two["result"]["sample"]).content
    r = client.post("/v1/flux-kontext-dev", json={"prompt": "x", "input_image_2": first})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][-1] == "input_image_2" and "needs input_image" in r.json()["detail"][0]["msg"]
    r = client.post("/v1/flux-kontext-dev", json={"prompt": "x", "input_image": first, "input_image_3": "not base64!"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "input_image_3"


def test_several_references_are_stored_as_one_blob_and_read_back_in_order():
    from kontext_server.jobstore.manager import pack_inputs, unpack_inputs

    files = [b"\x89PNG first", b"", b"third \x00 bytes"]
    assert unpack_inputs(pack_inputs(files)) == files
    assert pack_inputs([b"\x89PNG only"]) == b"\x89PNG only"  # one reference: the file itself, as before
    assert unpack_inputs(b"\x89PNG only") == [b"\x89PNG only"]
