"""Transformer files stored in fp8: recognise them, upcast their weights, and keep the scales the fp8 variant needs.

What: `inspect` finds the fp8 tensors of a single-file checkpoint and the scale stored with each (ComfyUI's "scaled
fp8" files name it `<module>.scale_weight`, others `<module>.weight_scale`): one number per tensor, one per output
row, or none (a plain cast). Any other scale layout (block-wise, per column) is refused at start-up, naming the
tensor. `upcast` gives the weight the model computes with: `(fp8.float() * scale).to(dtype)`. `row_scales` maps each
stored weight's scale, as a column of one fp32 per output row, to the diffusers linear it becomes (the same mapping
as the weights, bfl_layout.to_diffusers: it only splits and joins rows).
Why keep the scales: the fp8 variant (optimizations/low_precision.py) quantises every token-wise linear row-wise. A
weight stored as fp8 with one scale per row or per tensor (a per-tensor scale is a row scale repeated) is already
in that form: the fp8 variant takes the stored values and scales instead of quantising the upcast weight a second
time (optimizations/fp8/stored.py recovers them exactly from the upcast weight and these scales, and checks it).
Limits: activation scales stored for static quantisation (`scale_input`, `input_scale`) are not used: the fp8 GEMMs
scale each activation row at run time. e5m2 weights are upcast but never reused (the fp8 GEMMs take e4m3).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kontext_server.models import ModelLoadError
from kontext_server.models.safetensors_file import SafetensorsFile

FP8 = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # <module>.scale_weight (ComfyUI) / <module>.weight_scale
IGNORED_SUFFIXES = (".scale_input", ".input_scale")  # static activation scales: not used (dynamic row scales)
MARKERS = ("scaled_fp8",)  # ComfyUI's marker tensor of a scaled fp8 file


@dataclass
class Fp8Storage:
    """What a file stores in fp8, for /health and for the fp8 variant."""
    dtype: str  # "float8_e4m3fn", "float8_e5m2" (or both, comma-separated)
    tensors: int  # fp8 tensors in the file
    scaling: dict[str, int]  # "per-row" / "per-tensor" / "none" -> how many fp8 tensors have it
    scales: dict[str, str]  # fp8 weight key -> its scale's key (the weights that have one)
    ignored: list[str]  # keys read but not used (activation scales, markers)
    # diffusers linear name -> (out_features, 1) fp32 scale: weight = stored fp8 * scale (filled once mapped)
    row_scales: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def not_reusable(self) -> str | None:
        """None when the fp8 variant can take the stored weights as they are, else why not."""
        if "float8_e5m2" in self.dtype:
            return "stored as float8 e5m2; the fp8 GEMMs take e4m3"
        return None

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "tensors": self.tensors, "scaling": dict(self.scaling),
                "ignored": self.ignored[:8] + ([f"... {len(self.ignored) - 8} more"] if len(self.ignored) > 8 else []),
                "reusable_by_fp8_variant": self.not_reusable or "yes (e4m3 with per-row, per-tensor or no scales)"}


def is_auxiliary(name: str) -> bool:
    """A key that is not a model tensor: a weight scale, an activation scale, a marker."""
    return name.endswith(SCALE_SUFFIXES + IGNORED_SUFFIXES) or name in MARKERS


def inspect(file: SafetensorsFile, keys: dict[str, str]) -> Fp8Storage | None:
    """The file's fp8 storage, or None when it stores no fp8 weights. `keys`: the transformer's keys without
    prefix -> the file's keys (auxiliary keys included). ModelLoadError for a scale this server cannot apply."""
    fp8 = {k: full for k, full in keys.items() if not is_auxiliary(k) and file.tensors[full].dtype in FP8}
    if not fp8:
        return None
    scales, kinds = {}, Counter()
    for key, full in fp8.items():
        scale_key = next((key[: -len(".weight")] + s for s in SCALE_SUFFIXES
                          if key.endswith(".weight") and key[: -len(".weight")] + s in keys), None)
        if scale_key is None:
            kinds["none"] += 1
            continue
        shape, rows = file.tensors[keys[scale_key]].shape, file.tensors[full].shape[0]
        numel = 1
        for d in shape:
            numel *= d
        if numel == 1:
            kinds["per-tensor"] += 1
        elif len(file.tensors[full].shape) == 2 and shape in ((rows,), (rows, 1)):
            kinds["per-row"] += 1
        else:
            raise ModelLoadError(f"{file.path}: unsupported fp8 scale layout: {keys[scale_key]} has shape "
                                 f"{list(shape)} for the weight {full} of shape {list(file.tensors[full].shape)} "
                                 "(this server applies one scale per tensor or per output row)")
        scales[key] = scale_key
    dtypes = sorted({FP8[file.tensors[full].dtype] for full in fp8.values()})
    ignored = sorted(k for k in keys if k.endswith(IGNORED_SUFFIXES) or k in MARKERS)
    return Fp8Storage(dtype=", ".join(dtypes), tensors=len(fp8), scaling=dict(kinds), scales=scales, ignored=ignored)


def upcast(data: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weight an fp8 tensor stores: data * scale (per tensor or per output row), in `dtype`. Computed in fp32,
    rounded once: optimizations/fp8/stored.py relies on this exact formula to recover the stored values."""
    w = data.float()
    if scale is not None:
        w = w * row_column(scale, data.shape[0]) if scale.numel() > 1 else w * scale.float().reshape(())
    return w.to(dtype)


def row_column(scale: torch.Tensor | None, rows: int, device=None) -> torch.Tensor:
    """A scale as one fp32 per output row, shape (rows, 1) (no scale: ones)."""
    if scale is None:
        return torch.ones(rows, 1, dtype=torch.float32, device=device)
    scale = scale.float().to(device) if device is not None else scale.float()
    return scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(1, 1).expand(rows, 1).clone()


def describe(storage: Fp8Storage | None, path: Path) -> str:
    if storage is None:
        return ""
    scaling = ", ".join(f"{n} {kind}" for kind, n in sorted(storage.scaling.items()))
    return f"{path.name}: {storage.tensors} {storage.dtype} tensors ({scaling} scaled), upcast at load"
