"""The default output store: files under `<data dir>/outputs`, served by this server at
`/v1/files/<key>?expires=<unix>&sig=<hex>` (kontext_server/api/routes/files.py checks the signature and expiry: 403
otherwise).

Contract: as base.OutputStore. Writes go to a temporary name and are renamed into place, so a reader never sees half
a file; files are 0600. `path_for(key)` refuses any name that is not one of the store's keys (no path traversal).
Limits: one directory, no sub-folders; a sweep lists it once (fine for the tens of thousands of files a TTL of hours
leaves; more wants the S3 store and a bucket lifecycle rule).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import quote

from kontext_server.storage.base import KEY_RE, expiry_of_key, object_key
from kontext_server.storage.signing import UrlSigner

FILES_PREFIX = "/v1/files/"


class LocalOutputStore:
    kind = "local"

    def __init__(self, directory: Path, signer: UrlSigner):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.signer = signer

    def save(self, data: bytes, content_type: str, expires_at: float) -> str:
        key = object_key(content_type, expires_at)
        tmp = self.directory / f".{key}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self.directory / key)
        return key

    def url(self, key: str, expires_at: float, base_url: str) -> str:
        exp = int(expires_at)
        return (f"{base_url.rstrip('/')}{FILES_PREFIX}{quote(key)}?expires={exp}"
                f"&sig={self.signer.sign(key, exp)}")

    def path_for(self, key: str) -> Path | None:
        """The file of a valid key, or None (a name that is not a key, or no such file)."""
        if not KEY_RE.match(key):
            return None
        path = self.directory / key
        return path if path.is_file() else None

    def delete(self, key: str) -> None:
        if KEY_RE.match(key):
            try:
                (self.directory / key).unlink()
            except FileNotFoundError:
                pass

    def sweep(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        n = 0
        for entry in os.scandir(self.directory):
            exp = expiry_of_key(entry.name)
            if exp is not None and exp <= now:
                self.delete(entry.name)
                n += 1
            elif entry.name.endswith(".tmp") and entry.stat().st_mtime < now - 3600:  # a crash mid-write
                os.unlink(entry.path)
        return n

    def count(self) -> int:
        return sum(1 for e in os.scandir(self.directory) if expiry_of_key(e.name) is not None)
