"""The wire format of the OpenAI-compatible routes: the Images API's request, response, stream events and model list.

The request (`ImageRequest`, one model for /v1/images/generations' JSON and /v1/images/edits' form fields) takes:
- OpenAI's fields that Kontext can honour: prompt, model, n, size, quality, response_format, output_format,
  output_compression, stream, partial_images, background (auto / opaque: Kontext draws opaque images);
- OpenAI's fields that cannot change the image here, accepted and ignored: user and safety_identifier (identifiers
  for OpenAI's abuse monitoring; not logged), moderation (this server moderates nothing at either level);
- OpenAI's fields that would change the image in a way Kontext cannot: background "transparent", style, complexity,
  input_fidelity, frame_count, frame_duration_ms, svg. Each is a 400 naming it and saying why, never ignored;
- our own fields (the SDK's `extra_body=`), with InferenceRequest's own types and limits: seed, steps,
  guidance_scale, true_cfg_scale, negative_prompt, cache_threshold, strict and the use_* optimisation flags.
Anything else is a 400 naming the unknown field. Limits: n 1-4; size `auto` or `WxH` with each side a multiple of 16
in 256-2048; partial_images 0-3; output_compression 0-100.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from kontext_server.api.protocol import ModelInfo, OptimizationReport
from kontext_server.request import FLAG_TO_OPTIMIZATION, MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE, InferenceRequest

MAX_IMAGES = 4
MAX_PARTIAL_IMAGES = 3
Quality = Literal["low", "medium", "high", "auto"]
OutputFormat = Literal["png", "jpeg", "webp"]

# Our fields, taken with InferenceRequest's own declarations (types, limits, defaults), so the two cannot disagree.
EXTRA_FIELDS = ("seed", "steps", "guidance_scale", "true_cfg_scale", "negative_prompt", "cache_threshold", "strict",
                "loras", "aspect_ratio", "megapixels", "snap", *FLAG_TO_OPTIMIZATION)

# OpenAI fields that would change the output in a way this model cannot: refused, with the reason.
REFUSED = {
    "style": "style presets belong to retired DALL-E models; describe the style in the prompt",
    "complexity": "FLUX.1-Kontext has no planning-effort control; use quality to choose the speed tier",
    "input_fidelity": "Kontext always keeps what the instruction does not change; describe the change in the prompt",
    "frame_count": "this server returns still images (png, jpeg, webp), not GIF animations",
    "frame_duration_ms": "this server returns still images (png, jpeg, webp), not GIF animations",
    "svg": "this server returns raster images (png, jpeg, webp), not SVG",
}


def parse_size(value: str | None) -> tuple[int, int] | None:
    """`WxH` -> (W, H), within the server's limits; `auto` or None -> None (the server chooses). ValueError if not."""
    if value is None or value == "auto":
        return None
    w, sep, h = value.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit()):
        raise ValueError(f"size must be 'auto' or WIDTHxHEIGHT, e.g. 1024x1024 (got {value!r})")
    width, height = int(w), int(h)
    for side in (width, height):
        if side % SIDE_MULTIPLE or not MIN_SIDE <= side <= MAX_SIDE:
            raise ValueError(f"each side must be a multiple of {SIDE_MULTIPLE} in {MIN_SIDE}-{MAX_SIDE} "
                             f"(got {value!r})")
    return width, height


class _ImageRequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=4000, description="Instruction (edit) or description")
    model: str | None = Field(None, description="Omitted, the served model's id, or the name of one of its LoRA "
                                                "adapters (GET /v1/models lists them): that adapter runs at scale 1, "
                                                "before any of extra_body's `loras`")
    n: int | None = Field(None, ge=1, le=MAX_IMAGES)
    size: str | None = Field(None, description="auto, or WIDTHxHEIGHT: multiples of 16 in 256-2048")
    quality: Quality | None = Field(None, description="high: exact tier; medium: fp8; low: fast tier; auto: default")
    response_format: Literal["b64_json", "url"] | None = None
    output_format: OutputFormat | None = None
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg / webp quality (default 95)")
    stream: bool | None = None
    partial_images: int | None = Field(None, ge=0, le=MAX_PARTIAL_IMAGES)
    background: Literal["auto", "opaque", "transparent"] | None = None
    moderation: Literal["auto", "low"] | None = Field(None, description="accepted; this server moderates nothing")
    user: str | None = Field(None, description="accepted and ignored (not logged)")
    safety_identifier: str | None = Field(None, description="accepted and ignored (not logged)")
    style: Any = None
    complexity: Any = None
    input_fidelity: Any = None
    frame_count: Any = None
    frame_duration_ms: Any = None
    svg: Any = None

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        parse_size(v)
        return v

    @field_validator("background")
    @classmethod
    def _background(cls, v):
        if v == "transparent":
            raise ValueError("FLUX.1-Kontext draws opaque images: a transparent background is not supported")
        return v

    @field_validator(*REFUSED)
    @classmethod
    def _refused(cls, v, info):
        if v is not None:
            raise ValueError(f"not supported: {REFUSED[info.field_name]}")
        return v


ImageRequest = create_model(
    "ImageRequest", __base__=_ImageRequestBase, __doc__="The body of /v1/images/generations (JSON) and the fields of "
                                                        "/v1/images/edits (multipart), our extra fields included.",
    **{name: (InferenceRequest.model_fields[name].annotation, InferenceRequest.model_fields[name])
       for name in EXTRA_FIELDS})


# ---- responses ------------------------------------------------------------------------------------------------------
class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None


class UsageInputDetails(BaseModel):
    image_tokens: int = 0
    text_tokens: int = 0


class Usage(BaseModel):
    """OpenAI bills image models in tokens; this server counts none, so every field is 0 (docs/api.md)."""
    input_tokens: int = 0
    input_tokens_details: UsageInputDetails = UsageInputDetails()
    output_tokens: int = 0
    total_tokens: int = 0


class Report(BaseModel):
    """Our report, as the extra top-level field `kontext` (the SDK keeps unknown fields) and in headers."""
    request_id: str
    seed: int
    width: int
    height: int
    steps: int
    steps_computed: int
    steps_skipped: int
    timings_ms: dict[str, float]
    optimizations: dict[str, OptimizationReport]
    model: ModelInfo
    loras: list[dict] = []  # the LoRA adapters that ran: name, scale, rank
    context_parallel: dict | None = None  # with --context-parallel N: degree, attention split, padding
    warnings: list[str] = []
    size_reason: str | None = None  # why the output has its size
    references: int = 0  # reference images the model saw
    memory_tier: dict | None = None  # under --memory-budget: what ran offloaded for this request


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat
    size: str
    quality: Literal["low", "medium", "high"]
    usage: Usage = Usage()
    kontext: Report


class PartialImageEvent(BaseModel):
    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    b64_json: str
    background: Literal["opaque"] = "opaque"
    created_at: int
    output_format: OutputFormat
    partial_image_index: int
    quality: Literal["low", "medium", "high"]
    size: str


class CompletedEvent(BaseModel):
    type: Literal["image_generation.completed", "image_edit.completed"]
    b64_json: str
    background: Literal["opaque"] = "opaque"
    created_at: int
    output_format: OutputFormat
    quality: Literal["low", "medium", "high"]
    size: str
    usage: Usage = Usage()
    kontext: Report


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "black-forest-labs"
    parent: str | None = None  # a LoRA adapter's card: the served model it runs on (vLLM's field for its adapters)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
