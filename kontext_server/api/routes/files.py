"""GET /v1/files/{key}?expires=&sig=: the local output store's files, behind signed, expiring URLs.

Open without an API key (the signature is the credential, so the URLs can be handed to browsers and other
services); a missing, tampered or expired signature is a 403, a valid one for a deleted file a 404. Only the local
store serves here; with an S3 store this path answers 404. The log line names the path, never the query string."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from kontext_server.api.bfl import errors
from kontext_server.api.context import server
from kontext_server.storage.base import CONTENT_TYPES

router = APIRouter()


@router.get("/v1/files/{key}", include_in_schema=False)
async def get_file(key: str, request: Request, expires: str = "", sig: str = ""):
    store = server(request).output_store
    signer = getattr(store, "signer", None)
    if signer is None:
        return errors.error_response(404, "this server's output store does not serve files here")
    if not signer.verify(key, expires, sig, time.time()):
        return errors.error_response(403, "the URL's signature is invalid or has expired")
    path = store.path_for(key)
    if path is None:
        return errors.error_response(404, "the file has expired and was deleted")
    return FileResponse(path, media_type=CONTENT_TYPES.get(key.rsplit(".", 1)[-1], "application/octet-stream"),
                        headers={"Cache-Control": "private, max-age=60"})
