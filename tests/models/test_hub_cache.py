"""`--model` as a hub id: the local Hugging Face cache offline, and the one start-up message for a gated repository, a
missing one, an offline miss and a truncated or missing file (kontext_server/models/hub.py, safetensors_file.py).

The cache is built here as huggingface_hub lays it out: `models--org--name/blobs/<sha256>`,
`snapshots/<commit>/<path>` as relative symlinks to the blobs, `refs/main` holding the commit.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest

from kontext_server.models import ModelLoadError, hub, sources
from tests.helpers import ROOT
from tests.models.conftest import generate

REPO = "acme/tiny-kontext"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_hf_cache(pipeline_dir, cache, repo_id=REPO, commit=COMMIT):
    """`pipeline_dir` as huggingface_hub's cache holds a downloaded repository; returns the snapshot directory."""
    repo = cache / hub.repo_folder(repo_id)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    for path in sorted(p for p in pipeline_dir.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(pipeline_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, tiny_dir, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = build_hf_cache(tiny_dir, cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    return snapshot


def load_error(model: str, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as ei:
        sources.load_model(model, "cpu", **kwargs)
    return str(ei.value)


def test_a_repo_id_in_the_hf_cache_loads_offline_and_gives_the_same_image(offline_cache, reference):
    index = offline_cache / "model_index.json"
    assert index.is_symlink() and index.resolve().parent.name == "blobs"
    model = sources.load_model(REPO, "cpu")
    assert model.origin == {"kind": "hf-cache", "offline": True, "repo_id": REPO, "revision": COMMIT,
                            "path": str(offline_cache), "cache": str(offline_cache.parents[2])}
    assert not model.synthetic and model.source == REPO
    assert np.array_equal(generate(model.pipe).image, reference.image)


def test_a_repo_id_missing_from_the_cache_offline_says_where_it_looked_and_how_to_fill_it(offline_cache):
    cache = offline_cache.parents[2]
    msg = load_error("acme/absent")
    assert msg.startswith("Could not load model 'acme/absent': 'acme/absent' is not in the local Hugging Face cache "
                          "and HF_HUB_OFFLINE=1 forbids downloading it: ")
    assert f"{cache / 'models--acme--absent'} does not exist" in msg
    assert "`hf download acme/absent`" in msg and "HF_HUB_CACHE" in msg


def test_a_cached_repo_without_refs_main_offline_names_the_snapshot_to_pass(offline_cache):
    (offline_cache.parents[1] / "refs" / "main").unlink()
    msg = load_error(REPO)
    assert f"has no refs/main (snapshots: {COMMIT}; pass one as --model" in msg


def test_a_truncated_file_in_the_cache_is_named_at_start_up(offline_cache):
    shard = offline_cache / "transformer" / "diffusion_pytorch_model.safetensors"
    blob = shard.resolve()
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) // 2])
    msg = load_error(REPO)
    assert msg.startswith(f"Could not load model '{REPO}': {shard}: truncated: its header lists")
    # with --transformer the cached transformer is not loaded, so it is not checked either
    assert _try_with_transformer(offline_cache).endswith("no-such.safetensors: no such file (--transformer takes one "
                                                         ".safetensors file)")


def _try_with_transformer(offline_cache) -> str:
    try:
        sources.load_model(REPO, "cpu", transformer=str(offline_cache / "no-such.safetensors"))
    except ModelLoadError as exc:
        return str(exc)
    return ""


def test_a_missing_blob_in_the_cache_is_named_at_start_up(offline_cache):
    shard = offline_cache / "vae" / "diffusion_pytorch_model.safetensors"
    shard.resolve().unlink()
    msg = load_error(REPO)
    assert f"{shard}: a link to" in msg and "which does not exist (the cache's blob is missing" in msg


def test_the_tiny_model_saved_in_several_shards_loads_and_gives_the_same_image_as_one_shard(tiny_loaded, tmp_path,
                                                                                          reference):
    sharded = tmp_path / "sharded"
    tiny_loaded.pipe.save_pretrained(sharded, max_shard_size="100KB")
    index = sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    shards = sorted((sharded / "transformer").glob("diffusion_pytorch_model-*.safetensors"))
    assert index.is_file() and len(shards) >= 3, shards
    model = sources.load_model(str(sharded), "cpu")
    out = generate(model.pipe)
    assert np.array_equal(out.image, reference.image)
    shards[1].unlink()  # a shard the index names is missing: named before from_pretrained runs
    msg = load_error(str(sharded))
    assert f"{shards[1]}: missing: {index.name} lists it as a shard" in msg


# ---- online: huggingface_hub's own errors, simulated (no network here) ---------------------------------------------
@pytest.fixture
def online(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read when it is imported
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)

    def fail_with(exc):
        calls = []

        def download(repo_id, filename, **kwargs):
            calls.append((repo_id, filename))
            raise exc

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
        return calls
    return fail_with


def http_error(cls, status: int, text: str):
    url = f"https://huggingface.co/{sources.HUB_DEFAULT}/resolve/main/model_index.json"
    return cls(text, response=httpx.Response(status, request=httpx.Request("GET", url)))


def test_a_gated_repo_says_to_accept_the_licence_and_set_hf_token(online, monkeypatch):
    from huggingface_hub.errors import GatedRepoError

    calls = online(http_error(GatedRepoError, 401, "401 Client Error. Cannot access gated repo for url ..."))
    msg = load_error(sources.HUB_DEFAULT)
    assert calls == [(sources.HUB_DEFAULT, "model_index.json")]  # asked for the index only, before any download
    assert msg == (f"Could not load model '{sources.HUB_DEFAULT}': {sources.HUB_DEFAULT} is a gated repository on the "
                   "Hugging Face Hub and HF_TOKEN is not set. To load it: accept the licence at "
                   f"https://huggingface.co/{sources.HUB_DEFAULT} while logged in, then set HF_TOKEN to a read token "
                   "of that account (https://huggingface.co/settings/tokens). Or pass a local copy: --model "
                   "/path/to/diffusers-directory.")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert "and the token in HF_TOKEN has no access to it. To load it: accept the licence" in load_error(
        sources.HUB_DEFAULT)


def test_a_missing_repo_online_says_it_is_neither_a_directory_nor_on_the_hub(online):
    from huggingface_hub.errors import RepositoryNotFoundError

    online(http_error(RepositoryNotFoundError, 404, "404 Client Error. Repository Not Found"))
    msg = load_error("acme/nope")
    assert msg.startswith("Could not load model 'acme/nope': 'acme/nope' is neither a local directory (")
    assert "acme/nope does not exist) nor a repository on the Hugging Face Hub (or it is private: set HF_TOKEN)" in msg


def test_an_unreachable_hub_says_so_and_names_the_cache_it_looked_in(online, tmp_path):
    from huggingface_hub.errors import LocalEntryNotFoundError

    online(LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub"))
    msg = load_error("acme/nope")
    assert "could not reach the Hugging Face Hub to download 'acme/nope'" in msg
    assert str(tmp_path / "empty-hub" / "models--acme--nope") in msg and "HF_HUB_OFFLINE=1" in msg


def test_a_hub_error_wrapped_by_from_pretrained_is_still_recognised():
    from huggingface_hub.errors import GatedRepoError

    try:
        try:
            raise http_error(GatedRepoError, 403, "403 Client Error")
        except GatedRepoError as inner:
            raise OSError("diffusers could not load the pipeline") from inner
    except OSError as outer:
        assert "is a gated repository" in hub.hub_error_message(sources.HUB_DEFAULT, outer)
    assert hub.hub_error_message(sources.HUB_DEFAULT, ValueError("unrelated")) is None


def test_serve_with_a_gated_repo_exits_with_the_message(online, capsys):
    from huggingface_hub.errors import GatedRepoError

    from kontext_server import cli

    online(http_error(GatedRepoError, 401, "401 Client Error. Cannot access gated repo"))
    with pytest.raises(SystemExit) as ei:
        cli.main(["serve", "--model", sources.HUB_DEFAULT, "--device", "cpu", "--optimizations", "none"])
    assert str(ei.value.code).startswith(f"error: Could not load model '{sources.HUB_DEFAULT}': "
                                         f"{sources.HUB_DEFAULT} is a gated repository")


def test_serve_prints_the_message_and_exits_non_zero_without_a_traceback(offline_cache, bfl_file, tmp_path,
                                                                          cache_dir):
    """Two real `serve` processes, started together: an offline miss, and a truncated --transformer file."""
    cut = tmp_path / "cut.safetensors"
    data = bfl_file.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    env = {**os.environ, "FLUX_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, str(ROOT / "flux_kontext_optimized.py"), "serve", "--device", "cpu", "--port", "9"]
    procs = {
        "miss": subprocess.Popen(base + ["--model", "acme/absent"], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True),
        "cut": subprocess.Popen(base + ["--model", REPO, "--transformer", str(cut)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    }
    results = {name: (p.wait(timeout=300), p.stderr.read()) for name, p in procs.items()}
    rc, err = results["miss"]
    assert rc == 1 and "Traceback" not in err, err
    assert "error: Could not load model 'acme/absent': 'acme/absent' is not in the local Hugging Face cache" in err
    rc, err = results["cut"]
    assert rc == 1 and "Traceback" not in err, err
    assert f"error: Could not load --transformer {cut}: truncated: its header lists" in err


def test_a_cache_copied_without_symlinks_still_loads(tmp_path, tiny_dir, monkeypatch, reference):
    """A cache copied with `cp -rL` (files instead of links, as some copies and Windows make) is still a snapshot."""
    linked = tmp_path / "linked"
    build_hf_cache(tiny_dir, linked)
    flat = tmp_path / "flat"
    shutil.copytree(linked, flat, symlinks=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(flat))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = sources.load_model(REPO, "cpu")
    assert model.origin["kind"] == "hf-cache" and not (flat / hub.repo_folder(REPO) / "snapshots" / COMMIT /
                                                        "model_index.json").is_symlink()
    assert np.array_equal(generate(model.pipe).image, reference.image)
