"""Where `response_format: "url"` images would go: the `OutputStore` protocol an app may hold (None by default).

Contract: `put(data, content_type)` stores one encoded image and returns the URL a client fetches it from. It is
called in the thread pool (it may block on I/O), once per image. The server ships no store yet: without one, a
request for URLs is a 400 naming `response_format`. A store that serves files from this server must put them behind
the API keys (kontext_server.api.auth), or hand out signed URLs."""
from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class OutputStore(Protocol):
    def put(self, data: bytes, content_type: str) -> str:
        """Store `data` (an encoded image of `content_type`, e.g. image/png); return its URL."""
        ...
