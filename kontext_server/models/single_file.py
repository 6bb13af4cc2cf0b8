"""`--transformer PATH`: the FLUX.1-Kontext transformer from one `.safetensors` file in Black Forest Labs' layout.

What: `load_transformer` checks the file (safetensors_file: complete; bfl_layout: BFL's keys and this pipeline's
architecture; the dtypes: bf16 / fp16 / fp32 / fp8), reads its tensors one at a time onto the target device (fp8
weights upcast with their scales as they arrive, fp8_storage), maps the keys to diffusers' names and builds the
model through `FluxTransformer2DModel.from_single_file` into a meta-initialised model (low_cpu_mem_usage): the
tensors read become the parameters, with no second copy. Returns the module, what /health reports about the file,
and the fp8 storage (row scales) the fp8 variant reuses.
Config: the transformer config of `--model` when it has one on disk (a diffusers directory or a cached snapshot:
the transformer must fit the pipeline it joins), else the bundled FLUX.1-Kontext-dev config
(configs/flux-kontext-dev.json). Never the hub.
Contract: every problem with the file is a ModelLoadError naming the file and what is wrong (missing, not
safetensors, truncated, another model's keys or dimensions, a dtype it cannot read, a missing tensor).
Limits: one file (not sharded); the file's weights are held once in host memory when the device is the CPU, and
two pinned buffers of the largest tensor when it is a GPU (safetensors_file.StagedReader).
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kontext_server.models import ModelLoadError, bfl_layout, fp8_storage
from kontext_server.models.config import full_configs
from kontext_server.models.safetensors_file import SafetensorsFile, StagedReader

log = logging.getLogger(__name__)

ACCEPTED_DTYPES = ("BF16", "F16", "F32", "F8_E4M3", "F8_E5M2")
BUNDLED_CONFIG = "the bundled FLUX.1-Kontext-dev config (configs/flux-kontext-dev.json)"


@dataclass
class SingleFileTransformer:
    module: object  # FluxTransformer2DModel
    report: dict  # for /health: the file, its layout and storage, the config used, seconds
    fp8: fp8_storage.Fp8Storage | None  # what the file stores in fp8 (None: nothing)


def transformer_config(pipeline_dir: Path | None) -> tuple[dict, str]:
    """(config, where it came from): `pipeline_dir`/transformer/config.json when there is one, else the bundled."""
    if pipeline_dir is not None and (pipeline_dir / "transformer" / "config.json").is_file():
        path = pipeline_dir / "transformer" / "config.json"
        return json.loads(path.read_text()), f"the transformer config of --model ({path})"
    return dict(full_configs()["transformer"]), BUNDLED_CONFIG


def load_transformer(path: str | Path, device: str, dtype: torch.dtype,
                     pipeline_dir: Path | None = None) -> SingleFileTransformer:
    from diffusers import FluxTransformer2DModel

    t0 = time.perf_counter()
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file (--transformer takes one .safetensors file)")
    file = SafetensorsFile.open(path)
    prefix = bfl_layout.strip_prefix(file.tensors)
    keys = {k[len(prefix):]: k for k in file.tensors if k.startswith(prefix)}  # ComfyUI: also VAE, text encoders
    reason = bfl_layout.not_bfl_reason(keys)
    if reason:
        raise ModelLoadError(f"{path}: {reason}")
    _check_dtypes(path, file, keys)
    fp8 = fp8_storage.inspect(file, keys)
    weights = {k: full for k, full in keys.items() if not fp8_storage.is_auxiliary(k)}
    config, config_name = transformer_config(pipeline_dir)
    bfl_layout.check_architecture(path, {k: file.tensors[full].shape for k, full in weights.items()}, config,
                                  config_name)

    checkpoint = {}
    with StagedReader(file, device) as reader:
        for key, full in weights.items():
            t = reader.read(full)
            if fp8 is not None and file.tensors[full].dtype in fp8_storage.FP8:
                scale = reader.read(keys[fp8.scales[key]]) if key in fp8.scales else None
                t = fp8_storage.upcast(t, scale, dtype)  # the fp8 tensor is dropped as soon as it is upcast
            checkpoint[key] = t.to(dtype) if t.is_floating_point() else t
    read_s = time.perf_counter() - t0
    state = _to_diffusers(path, checkpoint, config)
    with tempfile.TemporaryDirectory(prefix="flux-transformer-config-") as cfg_dir, _quiet_fp32_warning():
        (Path(cfg_dir) / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **config}))
        module = FluxTransformer2DModel.from_single_file(state, config=cfg_dir, local_files_only=True,
                                                         device=device, dtype=dtype)
    del state
    left_on_meta = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if left_on_meta:
        raise ModelLoadError(f"{path}: incomplete: no weights for {len(left_on_meta)} parameters "
                             f"(e.g. {', '.join(left_on_meta[:3])})")
    if fp8 is not None:
        fp8.row_scales = _row_scales(file, keys, fp8, config)
    report = {
        "file": str(path), "bytes": file.size, "layout": "bfl" + (f" (prefix {prefix!r})" if prefix else ""),
        "stored_dtypes": dict(sorted(_dtype_counts(file, weights).items())),
        "config": config_name, "read_seconds": round(read_s, 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if len(keys) < len(file.tensors):
        report["other_keys_ignored"] = len(file.tensors) - len(keys)  # a ComfyUI checkpoint's VAE / text encoders
    if fp8 is not None:
        report["fp8"] = fp8.as_dict()
    log.info("transformer from %s in %.1f s (%s)", path, report["seconds"], fp8_storage.describe(fp8, path) or
             "not fp8")
    return SingleFileTransformer(module=module, report=report, fp8=fp8)


@contextlib.contextmanager
def _quiet_fp32_warning():
    """from_single_file ends with `model.to(dtype)` (a no-op here: the tensors are in `dtype` already), and
    diffusers 0.42.1 warns on every `.to(dtype)` of a model that "modules should be kept in float32: []" even when
    none should: a warning about nothing, on every start. Silenced for that call only."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_dtypes(path: Path, file: SafetensorsFile, keys: dict[str, str]) -> None:
    bad = {}
    for k, full in keys.items():
        if not fp8_storage.is_auxiliary(k) and file.tensors[full].dtype not in ACCEPTED_DTYPES:
            bad.setdefault(file.tensors[full].dtype, full)
    if bad:
        found = "; ".join(f"{dt} (e.g. {name})" for dt, name in sorted(bad.items()))
        raise ModelLoadError(f"{path}: wrong dtype: tensors stored as {found}. This server reads bf16, fp16, fp32 "
                             "and fp8 (e4m3, with or without scales) weights; a packed format (NF4, GGUF-style "
                             "integers) cannot be loaded: use a bf16 or fp8 file")


def _to_diffusers(path: Path, checkpoint: dict, config: dict) -> dict:
    try:
        state = bfl_layout.to_diffusers(checkpoint, config)
    except KeyError as exc:
        raise ModelLoadError(f"{path}: incomplete: tensor {exc.args[0]} is missing") from None
    except RuntimeError as exc:  # a split that does not fit: the shapes are not this config's
        raise ModelLoadError(f"{path}: wrong architecture: its tensors do not fit the config ({exc})") from None
    if checkpoint:
        log.warning("%s: %d keys not used: %s", path, len(checkpoint), ", ".join(sorted(checkpoint)[:5]))
    return state


def _dtype_counts(file: SafetensorsFile, weights: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for full in weights.values():
        name = str(file.tensors[full].torch_dtype).replace("torch.", "")
        counts[name] = counts.get(name, 0) + 1
    return counts


def _row_scales(file: SafetensorsFile, keys: dict[str, str], fp8: fp8_storage.Fp8Storage,
                config: dict) -> dict[str, torch.Tensor]:
    """Each fp8 weight's scale as an (out_features, 1) fp32 column, under the diffusers linear it became: the same
    key mapping applied to the columns (it only splits and joins rows), every other tensor a shape on "meta"."""
    columns = {}
    for key, full in keys.items():
        if fp8_storage.is_auxiliary(key):
            continue
        info = file.tensors[full]
        if info.dtype in fp8_storage.FP8 and len(info.shape) == 2:
            scale = file.read(keys[fp8.scales[key]]) if key in fp8.scales else None
            columns[key] = fp8_storage.row_column(scale, info.shape[0])
        else:
            columns[key] = torch.empty(info.shape, device="meta")
    mapped = bfl_layout.to_diffusers(columns, config)
    return {name[: -len(".weight")]: col.contiguous() for name, col in mapped.items()
            if name.endswith(".weight") and col.device.type != "meta"}
