"""Shared fixtures: the tiny model is built once per test session; servers are started once per module."""
from __future__ import annotations

import base64
import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import cublaslt_workspace  # noqa: E402

cublaslt_workspace.configure()  # as the server's entry points do: before any GEMM of the test process

# Bitwise-reproducible CPU GEMMs (MKL's strict "conditional numerical reproducibility" mode), before MKL's first call.
# Without it, two identical tiny generations in one long test process can differ in the last bit (4.8e-7 seen after
# tests/test_probe_sustained_step.py and the DPM-Solver test had run): MKL picks its code path per call, by the
# buffers' alignment and the threads it decides to use. Only AUTO,STRICT removed that here; AUTO and COMPATIBLE did
# not. Tests that assert bit-identical outputs (a cache with threshold 0 against none) rely on it.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from load_test import ServerProcess, free_port  # noqa: E402,F401  (free_port: used by tests through conftest)

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
                                    optimizations="qkv_fusion,channels_last,modulation_table,first_block_cache,dpm_solver"))
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


def transformer_inputs(transformer, n_img: int = 1024, n_txt: int = 512, seed: int = 0, device: str = "cuda",
                       dtype: torch.dtype = torch.bfloat16) -> dict:
    """Keyword arguments for one FluxTransformer2DModel call: random latents and text for a square image of n_img
    tokens, its position ids, timestep 0.7 and (when the model has it) guidance 2.5."""
    g = torch.Generator(device).manual_seed(seed)
    side = int(n_img**0.5)
    ids = torch.zeros(side, side, 3, device=device)
    ids[..., 1] = torch.arange(side, device=device)[:, None]
    ids[..., 2] = torch.arange(side, device=device)[None, :]
    cfg = transformer.config
    return dict(hidden_states=torch.randn(1, n_img, cfg.in_channels, generator=g, device=device, dtype=dtype),
                encoder_hidden_states=torch.randn(1, n_txt, cfg.joint_attention_dim, generator=g, device=device,
                                                  dtype=dtype),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g, device=device, dtype=dtype),
                timestep=torch.full((1,), 0.7, device=device, dtype=dtype), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(n_txt, 3, device=device),
                guidance=torch.full((1,), 2.5, device=device) if cfg.guidance_embeds else None, return_dict=False)


class LiveServer(ServerProcess):
    """`python flux_kontext_optimized.py serve --model tiny ...` in a subprocess on loopback (the load-test tool's
    server), with its cache and log in the test session's cache directory."""

    def __init__(self, cache_dir: Path, *extra: str, env: dict | None = None):
        super().__init__(extra=list(extra), cache_dir=str(cache_dir), env=env)


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
