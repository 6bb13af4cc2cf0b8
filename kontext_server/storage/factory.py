"""`open_output_store(spec, data_dir, endpoint_url)`: the store `--output-store` names (local, or s3://bucket/prefix)."""
from __future__ import annotations

from pathlib import Path

from kontext_server.storage.local import LocalOutputStore
from kontext_server.storage.signing import UrlSigner

SIGNING_KEY_FILE = "url-signing.key"


def open_output_store(spec: str | None, data_dir: Path, endpoint_url: str | None = None):
    spec = (spec or "local").strip()
    if spec == "local":
        return LocalOutputStore(Path(data_dir) / "outputs", UrlSigner.load_or_create(Path(data_dir) / SIGNING_KEY_FILE))
    if spec.startswith("s3://"):
        from kontext_server.storage.s3 import S3OutputStore

        return S3OutputStore(spec, endpoint_url=endpoint_url)
    raise ValueError(f"--output-store: expected local or s3://bucket/prefix (got {spec!r})")
