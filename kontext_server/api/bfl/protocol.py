"""The wire format of the BFL-shaped routes: the Kontext request (BFL's field names), the submit answer and the
result BFL clients poll for.

The request (`KontextRequest`) takes BFL's fields: prompt, input_image (base64, a data URL or an http(s) URL), seed,
aspect_ratio ("W:H" between 21:9 and 9:21; default: the input image's, or 1:1), output_format (jpeg / png; BFL's
default jpeg), webhook_url, webhook_secret, safety_tolerance (0-6: accepted and reported; no moderation model runs
here), prompt_upsampling (false only: true is a 422 that says why); and ours: steps, guidance, width and height
(instead of aspect_ratio), cache_threshold, strict and the use_* optimisation flags, with InferenceRequest's own
types and limits. Any other field is a 422 naming it.
Statuses (BFL's words): Pending (queued or running: `progress` says how far), Ready, Error, Task not found.
"""
from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from kontext_server.request import (FLAG_TO_OPTIMIZATION, MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE, InferenceRequest,
                                    prompt_not_blank)
from kontext_server.safe_http import MAX_URL_LENGTH

ASPECT_RE = re.compile(r"^(\d{1,3}):(\d{1,3})$")
MIN_ASPECT, MAX_ASPECT = 9 / 21, 21 / 9
DEFAULT_AREA = 1024 * 1024
MAX_SECRET_LENGTH = 256
EXTRA_FIELDS = ("seed", "steps", "width", "height", "cache_threshold", "strict", *FLAG_TO_OPTIMIZATION)
STATUSES = ("Pending", "Ready", "Error", "Task not found")


def aspect_size(aspect: str) -> tuple[int, int]:
    """"W:H" -> the size of that ratio at about 1 megapixel, sides multiples of 16 within the server's limits."""
    m = ASPECT_RE.match(aspect)
    w, h = int(m.group(1)), int(m.group(2))
    ratio = w / h

    def snap(v: float) -> int:
        return max(MIN_SIDE, min(MAX_SIDE, int(round(v / SIDE_MULTIPLE)) * SIDE_MULTIPLE))

    return snap(math.sqrt(DEFAULT_AREA * ratio)), snap(math.sqrt(DEFAULT_AREA / ratio))


class _KontextRequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=4000, description="The instruction (edit) or the description")
    input_image: str | None = Field(None, description="base64, a data URL, or an http(s) URL (PNG, JPEG, WebP)")
    input_image_2: str | None = Field(None, description="a second reference image (multi-reference), as input_image")
    input_image_3: str | None = Field(None, description="a third reference image, as input_image")
    input_image_4: str | None = Field(None, description="a fourth reference image, as input_image")
    aspect_ratio: str | None = Field(None, description="W:H between 21:9 and 9:21; default: the input's, or 1:1")
    output_format: Literal["jpeg", "png"] = "jpeg"
    webhook_url: str | None = Field(None, max_length=MAX_URL_LENGTH, description="http(s) URL POSTed the result")
    webhook_secret: str | None = Field(None, min_length=1, max_length=MAX_SECRET_LENGTH,
                                       description="HMAC-SHA256 key of the X-Webhook-Signature header")
    safety_tolerance: int = Field(2, ge=0, le=6, description="accepted and reported; no moderation model runs here")
    prompt_upsampling: bool = Field(False, description="false only: this server does not rewrite prompts")
    guidance: float = Field(2.5, ge=0.0, le=30.0, allow_inf_nan=False, description="FLUX's distilled guidance")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str) -> str:
        return prompt_not_blank(v)

    @field_validator("aspect_ratio")
    @classmethod
    def _aspect(cls, v):
        if v is None:
            return v
        m = ASPECT_RE.match(v)
        if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
            raise ValueError(f"aspect_ratio must be W:H with whole numbers, e.g. 16:9 (got {v!r})")
        ratio = int(m.group(1)) / int(m.group(2))
        if not MIN_ASPECT - 1e-9 <= ratio <= MAX_ASPECT + 1e-9:
            raise ValueError(f"aspect_ratio must be between 21:9 and 9:21 (got {v})")
        return v

    @field_validator("prompt_upsampling")
    @classmethod
    def _no_upsampling(cls, v):
        if v:
            raise ValueError("prompt upsampling rewrites the prompt with a language model, which this server does "
                             "not run: send false (or leave it out) and write the full prompt")
        return v

    @field_validator("webhook_url")
    @classmethod
    def _webhook_scheme(cls, v):
        if v is not None and not v.lower().startswith(("http://", "https://")):
            raise ValueError("webhook_url must be an http or https URL")
        return v

    @model_validator(mode="after")
    def _one_way_to_size(self):
        if self.aspect_ratio is not None and (getattr(self, "width", None) or getattr(self, "height", None)):
            raise ValueError("give aspect_ratio or width / height, not both")
        if self.webhook_secret is not None and self.webhook_url is None:
            raise ValueError("webhook_secret needs a webhook_url")
        return self


KontextRequest = create_model(
    "KontextRequest", __base__=_KontextRequestBase,
    __doc__="The body of POST /v1/flux-kontext-dev: BFL's fields and our extra ones.",
    **{name: (InferenceRequest.model_fields[name].annotation, InferenceRequest.model_fields[name])
       for name in EXTRA_FIELDS})


class SubmitResponse(BaseModel):
    id: str
    polling_url: str


class ResultResponse(BaseModel):
    id: str
    status: Literal["Pending", "Ready", "Error", "Task not found"]
    progress: float | None = None
    result: dict[str, Any] | None = None
    details: dict[str, Any] | None = None


class CancelResponse(BaseModel):
    id: str
    status: Literal["cancelled", "cancelling", "finished"]
    detail: str
