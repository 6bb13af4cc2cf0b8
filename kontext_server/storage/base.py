"""The output store's protocol, and the object names every store uses.

What: a store keeps encoded images until their expiry time and hands out URLs that stop working then.
- `save(data, content_type, expires_at) -> key`: stores the bytes (blocking I/O: call it from a worker thread);
- `url(key, expires_at, base_url) -> str`: a URL a client can GET until `expires_at` (Unix seconds). `base_url` is
  this server's public base (the local store serves its files itself; S3 ignores it);
- `delete(key)`: removes the object (missing is not an error);
- `sweep(now) -> int`: deletes every object whose expiry has passed (objects no job row points at included:
  the OpenAI routes' `response_format=url` images), returning how many.
Why keys carry their expiry: `<expires_at>-<random>.<ext>` lets a sweep decide from a name alone, on a directory or
a bucket listing, without a database of files; a key is unguessable (128 random bits) and holds no client data.
"""
from __future__ import annotations

import re
import secrets
from typing import Protocol, runtime_checkable

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
CONTENT_TYPES = {v: k for k, v in EXTENSIONS.items()}
KEY_RE = re.compile(r"^(\d{10,12})-([0-9a-f]{32})\.(png|jpg|webp)$")


class StoreError(RuntimeError):
    """The store could not save or delete an object (the message says why; never a credential)."""


def object_key(content_type: str, expires_at: float) -> str:
    ext = EXTENSIONS.get(content_type)
    if ext is None:
        raise StoreError(f"unsupported content type {content_type!r}")
    return f"{int(expires_at):d}-{secrets.token_hex(16)}.{ext}"


def expiry_of_key(key: str) -> int | None:
    """The expiry encoded in a key, or None for a name that is not one of ours."""
    m = KEY_RE.match(key)
    return int(m.group(1)) if m else None


@runtime_checkable
class OutputStore(Protocol):
    kind: str  # "local" or "s3", for /health and logs

    def save(self, data: bytes, content_type: str, expires_at: float) -> str:
        ...

    def url(self, key: str, expires_at: float, base_url: str) -> str:
        ...

    def delete(self, key: str) -> None:
        ...

    def sweep(self, now: float) -> int:
        ...
