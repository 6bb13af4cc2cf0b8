"""Shared fixtures: the tiny model is built once per test session; servers are started once per module."""
from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the device machine; skipped elsewhere)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache directory (tiny model, compile artifacts) for the whole session, shared with subprocesses."""
    d = Path(os.environ.get("FLUX_TEST_CACHE_DIR") or tmp_path_factory.mktemp("flux-cache"))
    import model_sources

    model_sources.ensure_tiny_saved(d)
    return d


@pytest.fixture(scope="session")
def tiny_service(cache_dir):
    """A loaded tiny FluxService with everything CPU supports prepared except compile (shared, read-mostly)."""
    from service import FluxService, ServiceConfig

    svc = FluxService(ServiceConfig(model="tiny", device="cpu", cache_dir=cache_dir,
                                    optimizations="qkv_fusion,channels_last,first_block_cache,dpm_solver"))
    svc.load()
    return svc


def png_b64(width: int = 256, height: int = 256, color=(200, 30, 30), fmt: str = "PNG") -> str:
    img = Image.new("RGB", (width, height), color)
    for x in range(0, width, 8):  # some structure, so encoders see more than a flat colour
        img.putpixel((x, (x * 7) % height), (0, 0, 255))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def decode_b64_image(s: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(s)))
    img.load()
    return img


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python flux_kontext_optimized.py serve ...` in a subprocess on loopback."""

    def __init__(self, cache_dir: Path, *extra: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = dict(os.environ, FLUX_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1", **(env or {}))
        self.log_path = cache_dir / f"server-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "flux_kontext_optimized.py"), "serve", "--model", "tiny", "--device", "cpu",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", *extra],
            cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def __enter__(self) -> "LiveServer":
        """`with LiveServer(...) as server:` waits until it serves, and stops it on the way out."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def live_server(cache_dir):
    with LiveServer(cache_dir, "--max-queue", "4") as server:
        yield server


@pytest.fixture(scope="module")
def client(cache_dir):
    """In-process client (lifespan run, model loaded before the first request)."""
    from fastapi.testclient import TestClient

    from api import ServerSettings, create_app
    from service import FluxService, ServiceConfig

    svc = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations="auto", cache_dir=cache_dir))
    app = create_app(svc, ServerSettings(max_queue=4, load_in_background=False))
    with TestClient(app) as c:
        yield c
