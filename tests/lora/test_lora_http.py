"""Adapters over HTTP (CPU, tiny, one worker): interleaved concurrent requests each get their own adapters, every
bad adapter is a 422 that names it (before the queue where a look-up can tell, else from the worker), and the model is
unchanged after each."""
from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from kontext_server.api.app import ServerSettings, create_app
from tests.lora.conftest import make_service

BODY = dict(prompt="a red car", width=256, height=256, steps=2, seed=3)


@pytest.fixture(scope="module")
def http(cache_dir, lora_dir):
    svc = make_service(cache_dir, lora_dir=lora_dir, lora_max_rank=8)
    with TestClient(create_app(svc, ServerSettings(max_queue=16, load_in_background=False))) as c:
        yield c


def post(c, loras=(), **extra):
    return c.post("/inference", json={**BODY, **extra, "loras": [{"name": n, "scale": s} for n, s in loras]})


def image(r) -> str:
    assert r.status_code == 200, r.text
    return r.json()["images"][0]


@pytest.fixture(scope="module")
def base_image(http):
    return image(post(http))


def test_a_response_reports_the_adapters_that_ran_and_times_their_load_outside_total(http):
    body = post(http, [("shared", 0.5), ("light", -1.0)]).json()
    assert body["loras"] == [{"name": "shared", "scale": 0.5, "rank": 4}, {"name": "light", "scale": -1.0, "rank": 8}]
    t = body["timings_ms"]
    assert t["lora_load"] > 0 and t["lora_switch"] >= 0
    assert t["total"] < t["request_total"]
    again = post(http, [("shared", 0.5), ("light", -1.0)]).json()  # loaded and in the slots already
    assert "lora_load" not in again["timings_ms"] and "lora_switch" not in again["timings_ms"]
    assert post(http).json()["loras"] == []


def test_interleaved_concurrent_requests_with_different_adapters_each_match_their_own_single_request_output(
        http, base_image):
    sets = [[("style", 1.0)], [("light", 1.0)], [], [("style", 1.0), ("light", 1.0)], [("style", -1.0)],
            [("shared_kohya", 2.0)]]
    alone = [image(post(http, s)) for s in sets]
    assert alone[2] == base_image and len(set(alone)) == len(sets)
    order = [i for _ in range(2) for i in (3, 0, 2, 5, 1, 4)]
    barrier = threading.Barrier(len(order))

    def fire(i):
        barrier.wait()
        return i, image(post(http, sets[i]))

    with ThreadPoolExecutor(len(order)) as pool:
        results = list(pool.map(fire, order))
    for i, img in results:
        assert img == alone[i], f"request {sets[i]} did not get its own output"


def check_422(r, index: int, name: str, words: str):
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "validation_error"
    detail = body["detail"][0]
    assert detail["field"] == f"loras.{index}.name"
    assert name in detail["message"] and words in detail["message"], detail["message"]
    return body


@pytest.mark.parametrize("name, words", [
    ("nope", "no file nope.safetensors"),
    ("corrupt", "cannot be read"),
    ("truncated", "cannot be read"),
    ("not_a_lora", "not a LoRA for this model"),
    ("other_model", "do not fit this model"),
    ("big", "rank 16 is larger than the server's slots (rank 8"),
])
def test_a_bad_adapter_is_a_422_naming_it_before_the_queue_and_the_model_is_unchanged(http, base_image, name,
                                                                                       words):
    check_422(post(http, [(name, 1.0)]), 0, name, words)
    check_422(post(http, [("style", 1.0), (name, 1.0)]), 1, name, words)
    assert image(post(http)) == base_image


@pytest.mark.parametrize("name, status, words", [
    ("later_style", 200, ""),
    ("later_embedder", 422, "a restart makes slots for them"),
    ("later_corrupt", 422, "cannot be read"),
])
def test_a_file_added_after_start_up_runs_or_is_a_422_from_the_worker(http, base_image, lora_source, lora_dir,
                                                                       name, status, words):
    shutil.copy(lora_source / f"{name}.safetensors", lora_dir / f"{name}.safetensors")
    r = post(http, [("light", 1.0), (name, 1.0)])
    if status == 200:
        assert image(r) == image(post(http, [("light", 1.0), ("style", 1.0)]))  # the same file as style
    else:
        check_422(r, 1, name, words)
    assert image(post(http)) == base_image


@pytest.mark.parametrize("loras, field", [
    ([{"name": n} for n in ("style", "light", "shared", "big")], "loras"),
    ([{"name": "style"}, {"name": "style", "scale": 2}], "loras"),
    ([{"name": "style", "scale": 4.5}], "loras.0.scale"),
    ([{"name": "style", "scale": float("nan")}], "loras.0.scale"),
    ([{"name": "../style"}], "loras.0.name"),
    ([{"name": "style", "weight": 1}], "loras.0.weight"),
])
def test_a_malformed_loras_field_is_a_422_naming_the_field(http, loras, field):
    import json

    r = http.post("/inference", content=json.dumps({**BODY, "loras": loras}).replace("NaN", "NaN"),
                  headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert field in [d["field"] for d in r.json()["detail"]], r.json()


def test_health_reports_the_library_the_loaded_adapters_and_the_slots(http):
    post(http, [("style", 1.0)])
    lora = http.get("/health").json()["lora"]
    assert lora["library"]["style"] == {"rank": 4, "targets": 22}
    assert "cannot be read" in lora["library"]["corrupt"]["error"]
    assert "larger than the slots' rank 8" in lora["library"]["big"]["error"]
    assert "style" in lora["loaded"] and lora["loaded"]["style"]["load_ms"] > 0
    slots = lora["slots"]
    assert slots["adapters_per_request"] == 3 and slots["rank"] == 8 and slots["modules"] > 0 and slots["mib"] > 0


def test_the_openai_routes_take_loras_as_extra_body_and_report_them_in_kontext(http, base_image):
    """The official SDK sends extra_body's loras as JSON on generations and as loras[][name] / loras[][scale] form
    fields on multipart edits; both run the adapters and name them in the `kontext` report; a bad one is a 400 in
    OpenAI's shape naming the adapter's field."""
    import base64
    import io

    from openai import BadRequestError, OpenAI

    sdk = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
    extra = {"steps": 2, "seed": 3, "loras": [{"name": "shared", "scale": 0.5}]}
    gen = sdk.images.generate(prompt=BODY["prompt"], size="256x256", extra_body=extra)
    assert gen.kontext["loras"] == [{"name": "shared", "scale": 0.5, "rank": 4}]
    assert gen.data[0].b64_json == image(post(http, [("shared", 0.5)]))  # the same adapters ran
    assert gen.data[0].b64_json != base_image
    png = io.BytesIO(base64.b64decode(base_image))
    png.name = "in.png"
    two = [{"name": "shared", "scale": 0.5}, {"name": "light", "scale": -1.0}]
    edit = sdk.images.edit(image=png, prompt="make it blue", size="256x256", extra_body={**extra, "loras": two})
    assert [lo["name"] for lo in edit.kontext["loras"]] == ["shared", "light"]
    with pytest.raises(BadRequestError) as err:
        sdk.images.generate(prompt="x", size="256x256", extra_body={**extra, "loras": [{"name": "nope", "scale": 1}]})
    assert err.value.body["param"] == "loras.0.name" and "nope" in err.value.body["message"]


def test_an_openai_client_selects_an_adapter_by_model_as_listed_by_v1_models(http, base_image):
    """As vLLM serves its adapters: GET /v1/models lists each adapter that can run as a model whose `parent` is the
    served model, and `model=<adapter>` runs it at scale 1 (before extra_body's loras); an adapter that cannot run
    is not listed, and naming it is the 404 an unknown model gets."""
    from openai import NotFoundError, OpenAI

    sdk = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
    cards = {m.id: m for m in sdk.models.list().data}
    assert list(cards)[0] == "tiny" and getattr(cards["tiny"], "parent", None) is None
    assert {"style", "light", "shared", "shared_kohya"} <= set(cards)
    assert all(getattr(cards[n], "parent") == "tiny" for n in cards if n != "tiny")
    assert not {"corrupt", "truncated", "not_a_lora", "other_model", "big"} & set(cards)  # 422s if named in loras
    extra = {"steps": 2, "seed": 3}
    r = sdk.images.generate(model="style", prompt=BODY["prompt"], size="256x256", extra_body=extra)
    assert r.kontext["loras"] == [{"name": "style", "scale": 1.0, "rank": 4}]
    assert r.data[0].b64_json == image(post(http, [("style", 1.0)]))
    both = sdk.images.generate(model="style", prompt=BODY["prompt"], size="256x256",
                               extra_body={**extra, "loras": [{"name": "light", "scale": -1.0}]})
    assert [(lo["name"], lo["scale"]) for lo in both.kontext["loras"]] == [("style", 1.0), ("light", -1.0)]
    assert both.data[0].b64_json == image(post(http, [("style", 1.0), ("light", -1.0)]))
    for name in ("big", "nope"):
        with pytest.raises(NotFoundError) as err:
            sdk.images.generate(model=name, prompt="x", size="256x256", extra_body=extra)
        assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
        assert "'style'" in err.value.body["message"]  # the adapters that exist are named
    assert image(post(http)) == base_image
