"""An fp8 single file on the GPU (marked `gpu`): the fp8 copy takes the file's stored weights, and stays within the
fp8 tolerance of the bf16 transformer upcast from the same file.

Run on the device machine: `python -m pytest -q -m gpu tests/gpu/test_gpu_single_file.py -s` (tiny model; seconds).
"""
from __future__ import annotations

import re

import pytest
import torch

from kontext_server.request import InferenceRequest
from tests.models.bfl_files import fp8_file, to_bfl

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def fp8_service(cache_dir, tmp_path_factory):
    from kontext_server.models import sources, tiny
    from kontext_server.service import FluxService, ServiceConfig

    state = sources.load_model("tiny", "cpu", cache_dir).pipe.transformer.state_dict()
    path = tmp_path_factory.mktemp("gpu-single-file") / "tiny-fp8-row.safetensors"
    fp8_file(to_bfl({k: v.clone() for k, v in state.items()}), path, "row")
    svc = FluxService(ServiceConfig(model=str(tiny.ensure_tiny_saved(cache_dir)), transformer=str(path),
                                    device="cuda", optimizations="qkv_fusion,low_precision", cache_dir=cache_dir))
    svc.load()
    return svc


def test_the_fp8_copy_reuses_every_stored_fp8_weight(fp8_service):
    detail = fp8_service.prepared["low_precision"]
    found = re.search(r"stored fp8 weights of tiny-fp8-row.safetensors reused for (\d+) of (\d+) fp8 linears", detail)
    assert found and found.group(1) == found.group(2) and int(found.group(1)) > 0, detail
    assert list(fp8_service.health()["model"]["transformer_file"]["fp8"]["scaling"]) == ["per-row"]


def test_the_fp8_copy_of_an_fp8_file_stays_within_the_fp8_tolerance(fp8_service):
    req = dict(prompt="make the car red", width=256, height=256, steps=4, seed=3)
    a = fp8_service.generate(InferenceRequest(**req, use_mxfp4=False), output_type="latent")
    b = fp8_service.generate(InferenceRequest(**req, use_mxfp4=True), output_type="latent")
    assert b.optimizations["low_precision"].applied
    rel = float((b.latents.float() - a.latents.float()).norm() / a.latents.float().norm())
    assert torch.isfinite(b.latents).all() and rel < 0.2, rel  # tests/gpu/test_gpu.py's end-to-end fp8 bound


def test_the_staged_reader_puts_every_tensor_on_the_gpu_unchanged(tmp_path):
    from safetensors.torch import save_file

    from kontext_server.models.safetensors_file import SafetensorsFile, StagedReader

    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(n, 7, generator=g).to(dt) for i, (n, dt) in
               enumerate([(300, torch.bfloat16), (5, torch.float32), (1000, torch.bfloat16), (0, torch.float16),
                          (64, torch.float8_e4m3fn), (300, torch.bfloat16)])}
    save_file(tensors, tmp_path / "f.safetensors")
    file = SafetensorsFile.open(tmp_path / "f.safetensors")
    with StagedReader(file, "cuda") as reader:
        got = {name: reader.read(name) for name in tensors}  # later reads reuse the two buffers while copies run
    torch.cuda.synchronize()
    for name, t in tensors.items():
        assert got[name].device.type == "cuda" and got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name].cpu().view(torch.uint8), t.view(torch.uint8)), name
