"""The S3 output store against moto's S3-compatible server on loopback: upload, a presigned URL fetched over HTTP,
the URL's X-Amz-Expires set from the result's remaining TTL, and deletion after the TTL (by the job manager's sweep
and by the store's own sweep of expired keys). moto checks neither signatures nor expiry, so tampering and expiry are
tested on the local store's own signed URLs (test_bfl_routes.py)."""
from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx
import pytest

from kontext_server.storage.s3 import S3OutputStore, parse_s3_uri
from tests.helpers import free_port
from tests.jobs.support import FAST, app_client, poll

BUCKET = "flux-outputs"


@pytest.fixture(scope="module")
def endpoint():
    from moto.server import ThreadedMotoServer

    mp = pytest.MonkeyPatch()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(name, value)  # boto3 reads its credentials from the environment, as in production
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
    yield url
    server.stop()
    mp.undo()


def objects(endpoint: str, prefix: str) -> list[str]:
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]


def expires_param(url: str) -> int:
    return int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0])


def test_an_object_is_uploaded_fetched_through_its_presigned_url_and_swept_after_expiry(endpoint):
    store = S3OutputStore(f"s3://{BUCKET}/unit", endpoint_url=endpoint)
    now = time.time()
    key = store.save(b"\x89PNG fake", "image/png", now + 120)
    assert objects(endpoint, "unit/") == [f"unit/{key}"]
    url = store.url(key, now + 120, "")
    assert 118 <= expires_param(url) <= 120
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == b"\x89PNG fake"
    assert store.sweep(now + 60) == 0 and store.count() == 1  # not yet expired
    assert store.sweep(now + 121) == 1 and objects(endpoint, "unit/") == []


def test_an_s3_backed_job_serves_its_sample_from_the_bucket_until_its_ttl_then_deletes_it(tiny_service, endpoint):
    store = S3OutputStore(f"s3://{BUCKET}/jobs", endpoint_url=endpoint)
    with app_client(tiny_service, output_store=store, result_ttl=30.0, sweep_interval=3600) as c:
        job = c.post("/v1/flux-kontext-dev", json={"prompt": "a car", "seed": 3, **FAST}).json()["id"]
        done, _ = poll(c, job)
        sample = done["result"]["sample"]
        assert sample.startswith(f"{endpoint}/{BUCKET}/jobs/") and 25 <= expires_param(sample) <= 30
        fetched = httpx.get(sample)
        assert fetched.status_code == 200 and fetched.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(objects(endpoint, "jobs/")) == 1
        assert c.app.state.server.jobs.sweep(time.time() + 31) == 1  # past the TTL
        assert objects(endpoint, "jobs/") == []
        assert c.get("/v1/get_result", params={"id": job}).json()["status"] == "Task not found"


def test_the_output_store_setting_takes_local_or_an_s3_uri():
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        parse_s3_uri("gs://bucket/x")
