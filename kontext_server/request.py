"""The generation request: what every route turns its body into, and what the service runs.

Validation lives here (pydantic, unknown fields forbidden) so that bad input becomes a 422 naming the field, and the
limits (sizes, steps, seeds) are declared once. The optimisation flags map to registry names (FLAG_TO_OPTIMIZATION).
Light to import (pydantic only): the CLI parses warm-up sizes with it before torch is loaded."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 256, 2048, 16
MAX_STEPS = 100
DEFAULT_STEPS = 28
DEFAULT_DPM_STEPS = 14  # DPM-Solver++ 2M reaches Euler-28 quality in about half the steps
MAX_SEED = 2**63 - 1
MAX_REFERENCES = 4  # reference images per request (BFL's API: input_image + input_image_2..4)
MIN_MEGAPIXELS, MAX_MEGAPIXELS = 0.0625, 4.0  # 256x256 .. 2048x2048
MIN_ASPECT, MAX_ASPECT = 9 / 21, 21 / 9
ASPECT_PATTERN = r"^(match_input_image|\d{1,4}(\.\d{1,3})?:\d{1,4}(\.\d{1,3})?)$"
MAX_LORAS_PER_REQUEST = 3  # the slots hold this many adapters at once (kontext_server/lora/slots.py)
LORA_SCALE_LIMIT = 4.0
# An adapter's name: the stem of its file in --lora-dir. No path separators, no leading dot.
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

# Request flag -> optimisation name (optimizations/registry.py). Names from the seed API; kept as they are.
FLAG_TO_OPTIMIZATION = {
    "use_compile": "compile",
    "use_qkv_fusion": "qkv_fusion",
    "use_channels_last": "channels_last",
    "use_modulation_table": "modulation_table",
    "use_first_block_cache": "first_block_cache",
    "use_flash_attention": "attention",
    "use_mxfp4": "low_precision",
    "use_dpm_solver": "dpm_solver",
    "use_cuda_graphs": "cuda_graphs",
}


# Names other APIs use for our fields (diffusers' pipeline arguments, BFL's and OpenAI's request fields): an unknown
# field with one of these names gets "did you mean" in its 422.
FIELD_ALIASES = {
    "num_inference_steps": "steps", "input_image": "image", "image_url": "image", "init_image": "image",
    "guidance": "guidance_scale", "cfg_scale": "guidance_scale", "true_cfg": "true_cfg_scale",
    "num_images_per_prompt": "num_images", "n": "num_images", "negative": "negative_prompt",
    "format": "output_format", "size": "width and height", "generator": "seed",
    "input_images": "images", "reference_images": "images", "input_image_2": "images", "ratio": "aspect_ratio",
}


def suggest_field(name: str) -> str | None:
    """The field an unknown name probably meant: a known alias, or a close spelling of a field."""
    import difflib

    if name in FIELD_ALIASES:
        return FIELD_ALIASES[name]
    close = difflib.get_close_matches(name, list(InferenceRequest.model_fields), n=1, cutoff=0.75)
    return close[0] if close else None


def _check_side(name: str, v: int | None) -> int | None:
    if v is not None and v % SIDE_MULTIPLE:
        raise ValueError(f"{name} must be a multiple of {SIDE_MULTIPLE} (got {v})")
    return v


def _no_explicit_size(name: str, info: ValidationInfo) -> None:
    """aspect_ratio, megapixels and snap choose the size: they do not combine with width or height."""
    given = [k for k in ("width", "height") if info.data.get(k) is not None]
    if given:
        raise ValueError(f"{name} chooses the output size: give it without {' and '.join(given)} (or give width "
                         "and height alone)")


def prompt_not_blank(v: str) -> str:
    """The prompt check every request model shares (this one and the BFL route's)."""
    if not v.strip():
        raise ValueError("prompt must not be blank")
    return v


class LoraSpec(BaseModel):
    """One adapter a request runs: its name in the server's LoRA directory and the strength it is applied with."""
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=LORA_NAME_PATTERN, description="the adapter's file stem in --lora-dir")
    scale: float = Field(1.0, ge=-LORA_SCALE_LIMIT, le=LORA_SCALE_LIMIT, allow_inf_nan=False,
                         description="multiplies the adapter's update (0: the base model's output)")


class InferenceRequest(BaseModel):
    # Unknown fields are an error: a misspelt flag ("use_complie") must not be silently ignored.
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=4000, description="Instruction (edit) or description (text-to-image)")
    image: str | None = Field(None, description="Input image: base64, a data URL or an http(s) URL (PNG/JPEG/WebP). "
                                                "Present = edit.")
    images: list[str] | None = Field(None, min_length=1, max_length=MAX_REFERENCES,
                                     description="1-4 reference images (base64, data URLs or http(s) URLs) instead "
                                                 "of `image`: the first sets the output's aspect ratio, all are seen "
                                                 "by the model")
    width: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE,
                              description="Multiple of 16; default from the input image")
    height: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE,
                               description="Multiple of 16; default from the input image")
    aspect_ratio: str | None = Field(None, pattern=ASPECT_PATTERN,
                                     description="W:H between 21:9 and 9:21, or match_input_image; instead of "
                                                 "width / height")
    megapixels: float | None = Field(None, ge=MIN_MEGAPIXELS, le=MAX_MEGAPIXELS, allow_inf_nan=False,
                                     description="output area in units of 1024x1024 pixels (default 1); instead of "
                                                 "width / height")
    snap: bool = Field(False, description="snap the size to Kontext's preferred resolution nearest the aspect ratio")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Default 28 (14 with use_dpm_solver)")
    guidance_scale: float = Field(2.5, ge=0.0, le=30.0, allow_inf_nan=False)
    true_cfg_scale: float = Field(1.0, ge=1.0, le=30.0, allow_inf_nan=False)
    negative_prompt: str | None = Field(None, max_length=4000, validate_default=True)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_images: int = Field(1, ge=1, le=4)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    loras: list[LoraSpec] = Field(default_factory=list, max_length=MAX_LORAS_PER_REQUEST,
                                  description="LoRA adapters to run, each with its scale (at most 3, names unique)")

    # Optimisation flags. None = the server's default for that optimisation: lossless ones that the server
    # prepared are on, lossy ones (fp8, DPM-Solver++ step count, step cache) are off unless asked for.
    use_compile: bool | None = None
    use_qkv_fusion: bool | None = None
    use_channels_last: bool | None = None
    use_modulation_table: bool | None = None
    use_first_block_cache: bool | None = None
    cache_threshold: float | None = Field(None, ge=0.0, le=10.0, allow_inf_nan=False,
                                          description="first-block cache threshold; default by scheduler: 0.12 "
                                                      "Euler, 0.24 DPM-Solver++ (optimizations/first_block_cache.py)")
    use_flash_attention: bool | None = None
    use_mxfp4: bool | None = None
    use_dpm_solver: bool | None = None
    use_cuda_graphs: bool | None = None
    strict: bool = Field(False, description="Fail with 422 instead of running without a requested optimisation")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str) -> str:
        return prompt_not_blank(v)

    @field_validator("width")
    @classmethod
    def _width_multiple(cls, v):
        return _check_side("width", v)

    @field_validator("height")
    @classmethod
    def _height_multiple(cls, v):
        return _check_side("height", v)

    @field_validator("images")
    @classmethod
    def _one_way_to_give_images(cls, v, info: ValidationInfo):
        if v is not None and info.data.get("image") is not None:
            raise ValueError("give `image` (one reference) or `images` (up to 4), not both")
        return v

    @field_validator("aspect_ratio")
    @classmethod
    def _aspect_in_range(cls, v, info: ValidationInfo):
        if v is None:
            return v
        _no_explicit_size("aspect_ratio", info)
        if v != "match_input_image":
            w, _, h = v.partition(":")
            if float(w) <= 0 or float(h) <= 0 or not MIN_ASPECT - 1e-9 <= float(w) / float(h) <= MAX_ASPECT + 1e-9:
                raise ValueError(f"aspect_ratio must be between 21:9 and 9:21 (got {v})")
        return v

    @field_validator("megapixels")
    @classmethod
    def _megapixels_alone(cls, v, info: ValidationInfo):
        if v is not None:
            _no_explicit_size("megapixels", info)
        return v

    @field_validator("snap")
    @classmethod
    def _snap_alone(cls, v, info: ValidationInfo):
        if v:
            _no_explicit_size("snap", info)
        return v

    @field_validator("negative_prompt")
    @classmethod
    def _negative_prompt_for_cfg(cls, v, info: ValidationInfo):
        # A field validator (after true_cfg_scale is validated) so the 422 names negative_prompt.
        if info.data.get("true_cfg_scale", 1.0) > 1.0 and not (v and v.strip()):
            raise ValueError("a non-empty negative_prompt is needed when true_cfg_scale > 1")
        return v

    @field_validator("loras")
    @classmethod
    def _unique_lora_names(cls, v: list[LoraSpec]) -> list[LoraSpec]:
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"each adapter may be named once (repeated: {', '.join(dup)}); give one scale instead")
        return v

    def reference_inputs(self) -> list[str]:
        """The reference images as the client sent them (base64 / data URLs): `image`, or `images`, or none."""
        if self.images:
            return list(self.images)
        return [self.image] if self.image is not None else []

    def flags(self) -> dict[str, bool | None]:
        """Optimisation name -> what the request said (True/False/None = server default)."""
        return {opt: getattr(self, flag) for flag, opt in FLAG_TO_OPTIMIZATION.items()}


def parse_warmup_sizes(spec: str | None) -> list[tuple[int, int, int]]:
    """"1024x1024,edit:1024x1024,edit2:1024x1024" -> [(1024, 1024, 0), (1024, 1024, 1), (1024, 1024, 2)]: warm-up
    shapes as (width, height, reference images). `edit:` is one reference image, `editN:` N of them (1-4), each at
    the output size. The count compares equal to the booleans earlier releases used (0 == False, 1 == True)."""
    out = []
    for part in (spec or "").split(","):
        part = part.strip().lower()
        if not part:
            continue
        refs, size = 0, part
        if ":" in part:
            prefix, _, size = part.partition(":")
            count = prefix.removeprefix("edit")
            if not prefix.startswith("edit") or not (count == "" or count.isdigit()):
                raise ValueError(f"warm-up size {part!r}: expected WxH or edit:WxH (editN:WxH: N reference "
                                 "images), e.g. edit2:1024x1024")
            refs = int(count) if count else 1
            if not 1 <= refs <= MAX_REFERENCES:
                raise ValueError(f"warm-up size {part!r}: an edit has 1 to {MAX_REFERENCES} reference images")
        w, sep, h = size.partition("x")
        if not (sep and w.isdigit() and h.isdigit()):
            raise ValueError(f"warm-up size {part!r}: expected WxH or edit:WxH (editN:WxH: N reference "
                                 "images), e.g. 1024x1024")
        try:  # the same limits as a request's width and height: a bad size fails here, not after loading the model
            InferenceRequest(prompt="warm-up", width=int(w), height=int(h))
        except ValidationError as exc:
            reasons = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"warm-up size {part!r}: {reasons}") from None
        out.append((int(w), int(h), refs))
    return out
