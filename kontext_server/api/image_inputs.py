"""An image field of a request (/inference's `image`, BFL's `input_image`): base64, a data URL, or an http(s) URL.

What: `read_image(value, policy)` -> (RGB PIL image, the image file's bytes). A URL is fetched by
kontext_server.safe_http (http(s) only, 3 redirects each re-checked, the 20 MB limit while streaming, the fetch
timeout, private addresses refused unless --allow-private-urls); the bytes then go through the same decoder and
limits as base64 (PNG / JPEG / WebP, 16.7 MP, decompression bombs). Every failure is an ImageInputError whose
status is 413 (too large) or 422 and whose message says why, without the URL's query string; the route names the
field. Blocking: call it in the thread pool.
"""
from __future__ import annotations

from kontext_server import safe_http
from utils import ImageInputError, decode_base64_image, decode_image_bytes

URL_SCHEMES = ("http://", "https://")


def is_url(value: str) -> bool:
    return value[:8].lower().startswith(URL_SCHEMES)


def read_image(value: str, policy: safe_http.FetchPolicy, resolver=safe_http.system_resolver):
    if is_url(value):
        try:
            raw = safe_http.fetch(value, policy, resolver)
        except safe_http.FetchError as exc:
            raise ImageInputError(f"could not be fetched: {exc}", status=exc.status) from None
        try:
            return decode_image_bytes(raw), raw
        except ImageInputError as exc:
            raise ImageInputError(f"{exc} (fetched from {safe_http.redact(value)})", status=exc.status) from None
    raw = decode_base64_image(value)
    return decode_image_bytes(raw), raw
