"""Signed, expiring URLs for the local store: HMAC-SHA256 of `<key>\n<expires>` under a key kept in the data
directory.

Contract: `UrlSigner.load_or_create(path)` reads 32 random bytes from `path`, or creates the file with mode 0600
(O_EXCL, so two processes never write different keys) — the key persists across restarts, so URLs handed out before
a restart keep working until they expire. `sign(key, expires)` gives the hex signature; `verify(key, expires, sig,
now)` is True only for an unexpired URL whose signature matches (compared in constant time). A URL's query string
is a credential: it is never logged (the file route logs the key only).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_BYTES = 32


class UrlSigner:
    def __init__(self, secret: bytes):
        if len(secret) < 16:
            raise ValueError("the URL-signing key must hold at least 16 bytes")
        self._secret = secret

    @classmethod
    def load_or_create(cls, path: Path) -> "UrlSigner":
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls(path.read_bytes())
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        return cls(path.read_bytes())

    def sign(self, key: str, expires: int) -> str:
        return hmac.new(self._secret, f"{key}\n{int(expires)}".encode(), hashlib.sha256).hexdigest()

    def verify(self, key: str, expires: str | int, signature: str, now: float) -> bool:
        try:
            exp = int(expires)
        except (TypeError, ValueError):
            return False
        good = hmac.compare_digest(self.sign(key, exp), signature or "")
        return good and now < exp
