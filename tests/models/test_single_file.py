"""`--transformer`: a single file in Black Forest Labs' layout, bf16/fp32 or fp8, and the start-up errors a bad file
gives (kontext_server/models/single_file.py, bfl_layout.py, fp8_storage.py, safetensors_file.py).

fp8 tolerance: the project's end-to-end fp8 test allows a relative latent error against bf16 below 0.2
(tests/gpu/test_gpu.py::test_fp8_end_to_end_fidelity_reported: 512x512, 4 steps); the same bound applies here.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kontext_server.models import ModelLoadError, bfl_layout, fp8_storage, sources
from tests.models.bfl_files import fp8_file, to_bfl
from tests.models.conftest import generate, rel_error

FP8_LATENT_TOLERANCE = 0.2  # tests/gpu/test_gpu.py::test_fp8_end_to_end_fidelity_reported


def test_the_products_key_mapping_inverts_the_tests_bfl_layout_exactly(tiny_loaded, tiny_bfl):
    state = tiny_loaded.pipe.transformer.state_dict()
    config = dict(tiny_loaded.pipe.transformer.config)
    back = bfl_layout.to_diffusers(dict(tiny_bfl), config)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key


def test_a_bfl_single_file_loads_through_transformer_and_gives_the_same_image_as_the_diffusers_directory(
        tiny_dir, bfl_file, reference):
    model = sources.load_model(str(tiny_dir), "cpu", transformer=str(bfl_file))
    report = model.transformer_file
    assert report["file"] == str(bfl_file) and report["layout"] == "bfl" and "fp8" not in report
    assert report["config"].startswith("the transformer config of --model")
    assert report["stored_dtypes"] == {"float32": len(to_bfl(model.pipe.transformer.state_dict()))}
    assert model.fp8 is None and "single file" in model.description
    assert model.stage_seconds["transformer_file"] >= 0 and model.host_memory["peak_rss_gib"] > 0
    out = generate(model.pipe)
    assert np.array_equal(out.image, reference.image)
    assert torch.equal(out.latents, reference.latents)


@pytest.mark.parametrize("scaling", ["row", "tensor", "none"])
def test_an_fp8_stored_file_loads_upcast_and_stays_within_the_fp8_tolerance(tiny_dir, tiny_bfl, reference,
                                                                           tmp_path, scaling):
    path = tmp_path / f"tiny-fp8-{scaling}.safetensors"
    stored = fp8_file(tiny_bfl, path, scaling)
    model = sources.load_model(str(tiny_dir), "cpu", transformer=str(path))

    fp8 = model.transformer_file["fp8"]
    assert fp8["dtype"] == "float8_e4m3fn" and fp8["tensors"] == len(stored)
    kind = {"row": "per-row", "tensor": "per-tensor", "none": "none"}[scaling]
    assert fp8["scaling"] == {kind: len(stored)}
    if scaling == "tensor":  # ComfyUI's scaled fp8: activation scales and the marker are read and not used
        ignored = model.fp8.ignored
        assert "scaled_fp8" in ignored and len([k for k in ignored if k.endswith(".scale_input")]) == len(stored)
    # the model computes with exactly fp8 * scale (bf16 / fp32 weights upcast once)
    t = model.pipe.transformer
    w_q = t.transformer_blocks[0].ff.net[0].proj.weight
    data, scale = stored["double_blocks.0.img_mlp.0.weight"]
    assert torch.equal(w_q, data.float() * (scale if scale is not None else 1.0))
    # every fp8 linear's scale kept for the fp8 variant, under its diffusers name, one per row
    scales = model.fp8.row_scales
    assert "single_transformer_blocks.0.proj_mlp" in scales and "transformer_blocks.0.attn.add_k_proj" in scales
    assert all(s.shape == (t.get_submodule(n).out_features, 1) for n, s in scales.items())
    out = generate(model.pipe)
    err = rel_error(out.latents, reference.latents)
    print(f"fp8 {scaling}: relative latent error {err:.4f}")
    assert 0 < err < FP8_LATENT_TOLERANCE, err


def test_health_reports_the_transformer_file_the_origin_and_the_host_memory(tiny_dir, bfl_file, cache_dir):
    from kontext_server.service import FluxService, ServiceConfig

    svc = FluxService(ServiceConfig(model=str(tiny_dir), transformer=str(bfl_file), device="cpu",
                                    optimizations="none", cache_dir=cache_dir))
    svc.load()
    model = svc.health()["model"]
    assert model["transformer_file"]["file"] == str(bfl_file)
    assert model["origin"] == {"kind": "directory", "path": str(tiny_dir.resolve())}
    assert set(model["load_stage_seconds"]) == {"transformer_file", "pipeline"}
    mem = model["host_memory"]
    assert mem["peak_rss_gib"] >= mem["rss_before_gib"] > 0 and mem["method"].startswith("VmHWM")


# ---- files that cannot be used: one start-up error naming the file and what is wrong -------------------------------
def load_error(tiny_dir, path) -> str:
    with pytest.raises(ModelLoadError) as ei:
        sources.load_model(str(tiny_dir), "cpu", transformer=str(path))
    return str(ei.value)


def test_a_truncated_file_is_refused_naming_the_file_and_how_much_is_missing(tiny_dir, bfl_file, tmp_path):
    cut = tmp_path / "cut.safetensors"
    data = bfl_file.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    msg = load_error(tiny_dir, cut)
    assert msg.startswith(f"Could not load --transformer {cut}: truncated: its header lists")
    assert "an interrupted download or copy? Download it again" in msg
    cut.write_bytes(data[:100])  # not even the header
    assert "truncated: its header alone needs" in load_error(tiny_dir, cut)


def test_a_file_that_is_not_safetensors_is_refused(tiny_dir, tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 4096)  # a zip (pickled torch checkpoint)
    assert "not a safetensors file" in load_error(tiny_dir, bad)
    assert f"{tmp_path / 'nope.safetensors'}: no such file" in load_error(tiny_dir, tmp_path / "nope.safetensors")


def test_a_file_of_another_architecture_is_refused_with_what_differs(tiny_dir, tiny_bfl, tmp_path):
    fill = dict(tiny_bfl)  # FLUX.1 Fill's image input is 384 channels wide
    fill["img_in.weight"] = torch.zeros(fill["img_in.weight"].shape[0], 384)
    save_file(fill, str(tmp_path / "fill.safetensors"))
    msg = load_error(tiny_dir, tmp_path / "fill.safetensors")
    assert "wrong architecture" in msg and "in_channels 384 (FLUX.1 Fill's input)" in msg
    schnell = {k: v for k, v in tiny_bfl.items() if not k.startswith(("guidance_in.", "single_blocks.1."))}
    save_file(schnell, str(tmp_path / "schnell.safetensors"))
    msg = load_error(tiny_dir, tmp_path / "schnell.safetensors")
    assert "num_single_layers 1 where the transformer config of --model" in msg and "schnell?" in msg


def test_a_diffusers_layout_or_foreign_file_is_refused_with_what_it_looks_like(tiny_dir, tiny_loaded, tmp_path):
    save_file(dict(tiny_loaded.pipe.transformer.state_dict()), str(tmp_path / "diffusers.safetensors"))
    assert "keys are in diffusers' layout" in load_error(tiny_dir, tmp_path / "diffusers.safetensors")
    save_file({"lora_unet_double_blocks_0.lora_down.weight": torch.zeros(4, 4)}, str(tmp_path / "lora.safetensors"))
    assert "looks like a LoRA" in load_error(tiny_dir, tmp_path / "lora.safetensors")


def test_a_file_in_a_dtype_the_server_cannot_read_is_refused(tiny_dir, tiny_bfl, tmp_path):
    packed = dict(tiny_bfl)
    packed["double_blocks.0.img_mlp.0.weight"] = torch.zeros(packed["double_blocks.0.img_mlp.0.weight"].shape,
                                                             dtype=torch.uint8)
    save_file(packed, str(tmp_path / "nf4.safetensors"))
    msg = load_error(tiny_dir, tmp_path / "nf4.safetensors")
    assert "wrong dtype: tensors stored as U8 (e.g. double_blocks.0.img_mlp.0.weight)" in msg


def test_a_file_missing_a_tensor_or_with_a_blockwise_scale_is_refused(tiny_dir, tiny_bfl, tmp_path):
    partial = {k: v for k, v in tiny_bfl.items() if k != "double_blocks.0.txt_mlp.2.bias"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    msg = load_error(tiny_dir, tmp_path / "partial.safetensors")
    assert "incomplete: tensor double_blocks.0.txt_mlp.2.bias is missing" in msg
    path = tmp_path / "blockwise.safetensors"
    fp8_file(tiny_bfl, path, "row")
    from safetensors.torch import load_file

    sd = load_file(str(path))
    sd["double_blocks.0.img_mlp.0.weight_scale"] = torch.ones(2, 2)
    save_file(sd, str(path))
    msg = load_error(tiny_dir, path)
    assert "unsupported fp8 scale layout: double_blocks.0.img_mlp.0.weight_scale has shape [2, 2]" in msg


def test_upcast_applies_per_row_and_per_tensor_scales():
    data = torch.tensor([[1.0, -2.0], [0.5, 4.0]]).to(torch.float8_e4m3fn)
    assert torch.equal(fp8_storage.upcast(data, torch.tensor([2.0, 3.0]), torch.float32),
                       torch.tensor([[2.0, -4.0], [1.5, 12.0]]))
    assert torch.equal(fp8_storage.upcast(data, torch.tensor(0.5), torch.float32),
                       torch.tensor([[0.5, -1.0], [0.25, 2.0]]))
    assert torch.equal(fp8_storage.upcast(data, None, torch.bfloat16), data.to(torch.bfloat16))
