"""The OpenAI-compatible routes: POST /v1/images/generations (JSON), POST /v1/images/edits (multipart), GET /v1/models.

Thin: parse the body, then serving.create_images. Validation errors here are 400 in OpenAI's shape naming the
field: the edits route validates its form fields itself; the generations route's body errors come through the app's
handler for FastAPI's validation errors, which answers /v1 paths in the same shape (kontext_server.api.app)."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from pydantic import ValidationError

from kontext_server.api.context import server
from kontext_server.api.errors import clean_errors
from kontext_server.api.openai import errors
from kontext_server.api.openai.forms import FormError, read_edit_form
from kontext_server.api.openai.protocol import ImageRequest, ImagesResponse, ModelCard, ModelList
from kontext_server.api.openai.serving import create_images

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
STARTED = int(time.time())  # /v1/models' `created`: when this process started (the model has no better date here)
RESPONSES = {400: {}, 401: {}, 404: {}, 413: {}, 429: {}, 500: {}, 503: {}, 504: {}}


@router.post("/images/generations", response_model=ImagesResponse, responses=RESPONSES)
async def generations(body: ImageRequest, request: Request):
    """Text-to-image. `stream: true` answers text/event-stream (partial images, then the completed image)."""
    return await create_images(request, body, None, edit=False)


@router.post("/images/edits", response_model=ImagesResponse, responses=RESPONSES,
             openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {"type": "object"}}}}})
async def edits(request: Request):
    """An edit of 1-4 reference images (multipart: `image` / `image[]` file parts, the other fields as form fields)."""
    try:
        fields, image_bytes = await read_edit_form(request)
    except FormError as exc:
        return errors.invalid(exc.param, str(exc))
    try:
        body = ImageRequest.model_validate(fields)
    except ValidationError as exc:
        return errors.validation_response(clean_errors(exc.errors()))
    return await create_images(request, body, image_bytes, edit=True)


@router.get("/models", response_model=ModelList)
async def models(request: Request):
    """The served model, then each LoRA adapter a request may select by its name as `model` (with `parent`)."""
    srv = server(request)
    adapters = [ModelCard(id=name, created=STARTED, owned_by="lora", parent=srv.model_id)
                for name in srv.service.lora_names()]
    return ModelList(data=[ModelCard(id=srv.model_id, created=STARTED), *adapters])
