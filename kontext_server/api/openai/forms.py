"""The body of POST /v1/images/edits: multipart/form-data with 1-4 reference images and the request's fields.

What: `read_edit_form(request)` returns (the fields as a dict of strings, each image's bytes in order), or raises
FormError naming the part at fault. The images are file parts named `image`, or `image[]` (the SDK's name for a
list), repeated for several references (the first sets the output's aspect ratio); every other part is a text
field, validated afterwards as ImageRequest (pydantic turns "4" and "true" into 4 and True).
Refused, with the reason: a fifth image, a `mask` or `markup` part (it edits by instruction: describe the change in
the prompt), a field given twice, a file in a text field, a body that is not multipart. Limits: Starlette's parser
with at most 8 files, 200 fields and 1 MiB per text field; the whole body is bounded by the app's body-size limit
before this reads it.
"""
from __future__ import annotations

import json

from fastapi import Request
from starlette.datastructures import UploadFile

from kontext_server.request import MAX_REFERENCES

IMAGE_PARTS = ("image", "image[]")
NOT_SUPPORTED = {
    "mask": "Kontext edits by instruction and takes no mask: describe the change (and where) in the prompt",
    "markup": "Kontext edits by instruction and takes no markup: describe the change in the prompt",
}


class FormError(ValueError):
    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


# The official SDK sends a multipart request's extra_body list of objects as repeated fields, all the names
# (`loras[][name]`) then all the scales (`loras[][scale]`): the k-th name goes with the k-th scale. A plain client
# may send `loras` as one JSON text field instead.
LORA_PARTS = {"loras[][name]": "name", "loras[][scale]": "scale"}


async def read_edit_form(request: Request) -> tuple[dict[str, str], list[bytes]]:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise FormError(None, "/v1/images/edits takes multipart/form-data: the image as a file part named image, "
                              "the other fields as form fields")
    async with request.form(max_files=8, max_fields=200) as form:
        fields: dict[str, str] = {}
        images: list[UploadFile] = []
        lora_parts: dict[str, list[str]] = {}
        for name, value in form.multi_items():
            if name in LORA_PARTS and isinstance(value, str):  # the SDK's extra_body loras, flattened
                lora_parts.setdefault(LORA_PARTS[name], []).append(value)
                continue
            if name in NOT_SUPPORTED:
                raise FormError(name, NOT_SUPPORTED[name])
            if name in IMAGE_PARTS:
                if not isinstance(value, UploadFile):
                    raise FormError("image", "must be a file part (an image file), not a text field")
                images.append(value)
            elif isinstance(value, UploadFile):
                raise FormError(name, "unexpected file part (only image takes a file)")
            elif name in fields:
                raise FormError(name, "given more than once")
            else:
                fields[name] = value
        if lora_parts:
            names, scales = lora_parts.get("name", []), lora_parts.get("scale", [])
            if len(names) != len(scales):
                raise FormError("loras", "as form fields, give every adapter both loras[][name] and loras[][scale] "
                                         "(or send loras as one JSON field)")
            loras = [{"name": n, "scale": sc} for n, sc in zip(names, scales)]
            if "loras" in fields:
                raise FormError("loras", "given both as JSON and as loras[][name] fields")
            fields["loras"] = loras
        elif "loras" in fields:
            try:
                fields["loras"] = json.loads(fields["loras"])
            except ValueError:
                raise FormError("loras", 'a form field loras must be JSON, e.g. [{"name": "style", "scale": 0.8}]') \
                    from None
        if not images:
            raise FormError("image", "required: the reference image to edit, as a file part named image")
        if len(images) > MAX_REFERENCES:
            raise FormError("image", f"at most {MAX_REFERENCES} reference images (image parts); this request has "
                                     f"{len(images)}")
        data = [await im.read() for im in images]
    return fields, data
