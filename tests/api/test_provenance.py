"""Provenance and the safety hook over HTTP (app in process, tiny model, 256x256, 1 step): the AI-generated metadata
on every route by default, the prompt only when asked, none with the flag; a C2PA manifest signed with a test chain
and read back with c2pa-python; the stub safety checker blocking a flagged prompt (422 content_policy / OpenAI 400
moderation_blocked) and a flagged output."""
from __future__ import annotations

import base64
import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from kontext_server.api.app import ServerSettings, create_app
from kontext_server.provenance import MAKE, ProvenanceConfigError, read_manifest
from tests.c2pa_certs import make_chain
from tests.helpers import png_b64
from tests.stubs import safety as stub

BODY = {"prompt": "a red car", "width": 256, "height": 256, "steps": 1, "seed": 1}
EXIF_MAKE, EXIF_MODEL, EXIF_SOFTWARE, EXIF_DESCRIPTION = 0x010F, 0x0110, 0x0131, 0x010E


@pytest.fixture(scope="module")
def service(cache_dir):
    from kontext_server.service import FluxService, ServiceConfig

    svc = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations="none", cache_dir=cache_dir))
    svc.load()
    return svc


def client_for(service, **settings) -> TestClient:
    return TestClient(create_app(service, ServerSettings(load_in_background=False, **settings)))


def inference_png(client, **fields) -> bytes:
    r = client.post("/inference", json={**BODY, **fields})
    assert r.status_code == 200, r.text[:300]
    return base64.b64decode(r.json()["images"][0])


def opened(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def test_every_image_says_what_made_it_by_default_without_the_prompt(service):
    with client_for(service) as c:
        png = opened(inference_png(c))
        assert png.text["Make"] == MAKE and png.text["Model"] == "tiny"
        assert png.text["Software"].startswith("flux-kontext-server ") and "AI-generated" in png.text["Comment"]
        exif = png.getexif()
        assert exif[EXIF_MAKE] == MAKE and exif[EXIF_MODEL] == "tiny" and EXIF_DESCRIPTION not in exif
        assert "Description" not in png.text
        r = c.post("/v1/images/generations", json={"prompt": "a red car", "size": "256x256", "steps": 1,
                                                   "output_format": "jpeg"})
        jpeg = opened(base64.b64decode(r.json()["data"][0]["b64_json"]))
        assert jpeg.format == "JPEG" and jpeg.getexif()[EXIF_MAKE] == MAKE
        health = c.get("/health").json()
        assert health["provenance"] == {"metadata": True, "prompt_in_metadata": False, "c2pa": None,
                                        "invisible_watermark": False}
        assert health["safety_checker"] is None
        refs = health["reference_images"]  # the figures measured on the GPU, with where they come from
        assert refs["max_per_request"] == 4 and refs["cost_per_extra_reference_1024"]["gpu"].startswith("H100")


def test_the_prompt_is_written_only_when_asked_and_nothing_with_the_flag(service):
    with client_for(service, provenance_prompt=True) as c:
        png = opened(inference_png(c))
        assert png.text["Description"] == BODY["prompt"] and png.getexif()[EXIF_DESCRIPTION] == BODY["prompt"]
    with client_for(service, provenance_metadata=False) as c:
        png = opened(inference_png(c))
        assert not png.text and not dict(png.getexif())


def test_a_configured_certificate_signs_a_c2pa_manifest_that_reads_back(service, tmp_path):
    cert, key = make_chain(tmp_path)
    with client_for(service, c2pa_cert=str(cert), c2pa_key=str(key)) as c:
        data = inference_png(c)
        assert c.get("/health").json()["provenance"]["c2pa"]["algorithm"] == "es256"
    store = read_manifest(data, "png")
    assert store is not None, "no C2PA manifest in the image"
    manifest = store["manifest"]
    actions = [a for assertion in manifest["assertions"] if assertion["label"].startswith("c2pa.actions")
               for a in assertion["data"]["actions"]]
    assert [a["action"] for a in actions] == ["c2pa.created"]
    assert actions[0]["digitalSourceType"].endswith("/trainedAlgorithmicMedia")
    assert actions[0]["softwareAgent"]["name"] == "tiny"
    assert manifest["claim_generator_info"][0]["name"] == "flux-kontext-server"
    successes = {s["code"] for s in store["validation_results"]["activeManifest"]["success"]}
    assert {"claimSignature.validated", "assertion.dataHash.match"} <= successes  # the signature and pixels check
    assert opened(data).text["Make"] == MAKE  # the metadata survives the signing


def test_an_unsigned_image_has_no_manifest_and_a_tampered_one_fails_its_hash(service, tmp_path):
    with client_for(service) as c:
        assert read_manifest(inference_png(c), "png") is None
    cert, key = make_chain(tmp_path)
    with client_for(service, c2pa_cert=str(cert), c2pa_key=str(key)) as c:
        r = c.post("/v1/images/generations", json={"prompt": "x", "size": "256x256", "steps": 1,
                                                   "output_format": "jpeg"})
    data = bytearray(base64.b64decode(r.json()["data"][0]["b64_json"]))
    assert read_manifest(bytes(data), "jpeg")["validation_state"] in ("Valid", "Trusted")
    data[-100] ^= 0xFF  # a byte of the image data, after the manifest
    failures = read_manifest(bytes(data), "jpeg")["validation_results"]["activeManifest"].get("failure", [])
    assert any(f["code"] == "assertion.dataHash.mismatch" for f in failures)


def test_a_certificate_c2pa_cannot_sign_with_stops_the_start(service, tmp_path):
    cert, key = make_chain(tmp_path, self_signed_leaf=True)
    with pytest.raises(ProvenanceConfigError, match="c2pa"):
        create_app(service, ServerSettings(load_in_background=False, c2pa_cert=str(cert), c2pa_key=str(key)))
    with pytest.raises(ProvenanceConfigError, match="both"):
        create_app(service, ServerSettings(load_in_background=False, c2pa_cert=str(cert)))


def test_the_safety_checker_blocks_a_flagged_prompt_before_any_work(service):
    stub.CALLS.clear()
    with client_for(service, safety_checker="tests.stubs.safety:flag_keyword") as c:
        r = c.post("/inference", json={**BODY, "prompt": "something Forbidden", "image": png_b64()})
        assert r.status_code == 422, r.text[:300]
        body = r.json()
        assert body["error"] == "content_policy" and body["detail"][0]["field"] == "prompt"
        assert "forbidden" in body["message"]
        assert stub.CALLS == [("something Forbidden", 1)]  # the input check saw the input image; nothing ran
        err = c.post("/v1/images/generations", json={"prompt": "forbidden", "size": "256x256"}).json()["error"]
        assert (err["code"], err["param"], err["type"]) == ("moderation_blocked", "prompt", "invalid_request_error")
        ok = c.post("/inference", json=BODY)
        assert ok.status_code == 200 and stub.CALLS[-2:] == [("a red car", 0), ("a red car", 1)]  # before, after
        assert c.get("/health").json()["safety_checker"]["blocked_input"] == 2


def test_the_safety_checker_blocks_a_flagged_output_on_every_route(service):
    with client_for(service, safety_checker="tests.stubs.safety:flag_keyword") as c:
        r = c.post("/inference", json={**BODY, "prompt": "flag-the-output please"})
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "output"
        r = c.post("/v1/images/generations", json={"prompt": "flag-the-output", "size": "256x256", "steps": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "moderation_blocked"
        with c.stream("POST", "/v1/images/generations", json={"prompt": "flag-the-output", "size": "256x256",
                                                              "steps": 4, "stream": True, "partial_images": 2}) as s:
            events = [line for line in s.iter_lines() if line.startswith("event:")]
        assert events == ["event: error"]  # not even a preview of the blocked image was sent


def test_a_checker_that_fails_blocks_the_request_and_a_bad_name_stops_the_start(service):
    with client_for(service, safety_checker="tests.stubs.safety:broken") as c:
        r = c.post("/inference", json=BODY)
        assert r.status_code == 500 and r.json()["error"] == "safety_check_failed"
    for spec in ("tests.stubs.safety", "tests.stubs.nowhere:check", "tests.stubs.safety:CALLS"):
        with pytest.raises(ValueError, match="--safety-checker"):
            create_app(service, ServerSettings(load_in_background=False, safety_checker=spec))


def test_the_cli_generate_writes_the_metadata_too(cache_dir, tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT

    out = tmp_path / "out.png"
    env = {"FLUX_CACHE_DIR": str(cache_dir)}
    import os

    run = subprocess.run([sys.executable, str(ROOT / "flux_kontext_optimized.py"), "generate", "--model", "tiny",
                          "--prompt", "a red car", "--steps", "1", "--width", "256", "--height", "256", "--out",
                          str(out), "--provenance-prompt"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert run.returncode == 0, run.stderr[-2000:]
    png = opened(out.read_bytes())
    assert png.text["Make"] == MAKE and png.text["Description"] == "a red car"
    assert json.loads(run.stdout)["out"] == str(out)
