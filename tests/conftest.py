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

from tests.helpers import LiveServer  # noqa: E402

# Without a GPU, our Triton kernels run in Triton's CPU interpreter (read when a kernel module is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _round_interpreter_casts_like_the_gpu() -> None:
    """Triton's interpreter (`_convert_float` in triton/runtime/interpreter.py, Triton 3.6-3.9) truncates fp32 ->
    bf16 casts and rounds fp32 -> fp8 e4m3 without carrying a mantissa overflow into the exponent (127.97 becomes 64,
    not 128). The GPU rounds both to nearest even (fp8 saturating at 448). Our kernels' tests compare roundings, so
    under the interpreter these two casts are done by torch, which rounds as the GPU does; all else is Triton's."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter._convert_float
    targets = {tl.bfloat16: (torch.bfloat16, torch.int16, np.uint16),
               tl.float8e4nv: (torch.float8_e4m3fn, torch.uint8, np.uint8)}

    def convert(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype in targets and rounding_mode != interpreter._ir.ROUNDING_MODE.RTZ:
            dtype, bits, np_bits = targets[output_dtype]
            x = torch.from_numpy(np.ascontiguousarray(data).view(np.float32))
            if dtype == torch.float8_e4m3fn:
                x = x.clamp(-448.0, 448.0)  # the GPU's cvt.rn.satfinite; NaN stays NaN
            return x.to(dtype).view(bits).numpy().view(np_bits).reshape(data.shape)
        return original(data, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert


_round_interpreter_casts_like_the_gpu()


def _interpreter_dot_reads_bf16_as_numbers() -> None:
    """Triton's interpreter (`create_dot`, Triton 3.9) keeps bf16 tiles as their raw 16-bit patterns (numpy has no
    bf16) and multiplies those integers. The GPU multiplies the values, accumulating in fp32: so does this."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = type(interpreter.interpreter_builder)
    original = builder.create_dot

    def values(h):
        if h.dtype.scalar == tl.bfloat16:
            return (h.data.astype(np.uint32) << 16).view(np.float32)
        return h.data

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        out = np.matmul(values(a), values(b), dtype=np.float32) + d.data
        return interpreter.TensorHandle(out.astype(d.data.dtype), d.dtype.scalar)

    builder.create_dot = create_dot


_interpreter_dot_reads_bf16_as_numbers()


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
