"""Shared fixtures: the tiny model is built once per test session; servers are started once per module."""
from __future__ import annotations

import os
from pathlib import Path

from kontext_server.startup import cublaslt_workspace  # noqa: E402

cublaslt_workspace.configure()  # as the server's entry points do: before any GEMM of the test process

# Bitwise-reproducible CPU GEMMs (MKL's strict "conditional numerical reproducibility" mode), before MKL's first call.
# Without it, two identical tiny generations in one long test process can differ in the last bit (4.8e-7 seen after
# tests/bench/test_probe_sustained_step.py and the DPM-Solver test had run): MKL picks its code path per call, by the
# buffers' alignment and the threads it decides to use. Only AUTO,STRICT removed that here; AUTO and COMPATIBLE did
# not. Tests that assert bit-identical outputs (a cache with threshold 0 against none) rely on it.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402
import torch  # noqa: E402

from optimizations.kernels.interpreter import match_the_gpu  # noqa: E402
from tests.helpers import LiveServer  # noqa: E402

# Without a GPU, our Triton kernels run in Triton's CPU interpreter (read when a kernel module is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ...and computes as the GPU does where the interpreter does not (its casts to bf16 / fp8 and its bf16 dots): our
# kernels' tests compare roundings.
match_the_gpu()


BENCH_TESTS = Path(__file__).parent / "bench"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the device machine; skipped elsewhere)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores")
    config.addinivalue_line("markers", "bench: tests of the probes and kernel benches in bench/ (CI runs them; "
                                       "-m 'not bench' leaves them out)")


def pytest_collection_modifyitems(config, items):
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if BENCH_TESTS in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.bench)
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache directory (tiny model, compile artifacts) for the whole session, shared with subprocesses."""
    d = Path(os.environ.get("FLUX_TEST_CACHE_DIR") or tmp_path_factory.mktemp("flux-cache"))
    from kontext_server.models import tiny

    tiny.ensure_tiny_saved(d)
    return d


@pytest.fixture(scope="session")
def tiny_service(cache_dir):
    """A loaded tiny FluxService with everything CPU supports prepared except compile (shared, read-mostly)."""
    from kontext_server.service import FluxService, ServiceConfig

    svc = FluxService(ServiceConfig(model="tiny", device="cpu", cache_dir=cache_dir,
                                    optimizations="qkv_fusion,channels_last,modulation_table,first_block_cache,dpm_solver"))
    svc.load()
    return svc


@pytest.fixture(scope="module")
def live_server(cache_dir):
    with LiveServer(cache_dir, "--max-queue", "4") as server:
        yield server


@pytest.fixture(scope="module")
def client(cache_dir):
    """In-process client (lifespan run, model loaded before the first request)."""
    from fastapi.testclient import TestClient

    from kontext_server.api.app import ServerSettings, create_app
    from kontext_server.service import FluxService, ServiceConfig

    svc = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations="auto", cache_dir=cache_dir))
    app = create_app(svc, ServerSettings(max_queue=4, load_in_background=False))
    with TestClient(app) as c:
        yield c
