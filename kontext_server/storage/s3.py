"""Outputs in an S3-compatible bucket (AWS S3, Cloudflare R2, MinIO) through boto3, handed out as presigned GET URLs.

What: `--output-store s3://bucket/prefix` (+ `--s3-endpoint-url` for R2 / MinIO). Objects are `<prefix>/<key>`;
`url()` presigns a GET whose lifetime (X-Amz-Expires) is the time left until the result expires, so the URL dies
with the result. `sweep()` lists the prefix and deletes the objects whose key says they expired (a bucket lifecycle
rule is a good second line; it is not required).
Contract: credentials and region come from boto3's usual sources (AWS_* variables, ~/.aws, an instance role);
nothing here reads or logs them. SigV4 presigned URLs live at most 7 days, so the TTL is limited to that.
Limits: one PUT per image (no multipart: an image is a few MB at most).
"""
from __future__ import annotations

import time
from urllib.parse import urlparse

from kontext_server.storage.base import StoreError, expiry_of_key, object_key

MAX_PRESIGN_SECONDS = 7 * 24 * 3600


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, prefix without slashes at either end)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"--output-store: expected local or s3://bucket/prefix (got {uri!r})")
    return parsed.netloc, parsed.path.strip("/")


class S3OutputStore:
    kind = "s3"

    def __init__(self, uri: str, endpoint_url: str | None = None, client=None):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = parse_s3_uri(uri)
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url,
                                             config=Config(signature_version="s3v4", retries={"max_attempts": 3},
                                                           connect_timeout=5, read_timeout=30))

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def save(self, data: bytes, content_type: str, expires_at: float) -> str:
        key = object_key(content_type, expires_at)
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._name(key), Body=data, ContentType=content_type)
        except Exception as exc:  # botocore's errors: the message names the bucket and the code, never the keys
            raise StoreError(f"could not upload to s3://{self.bucket}/{self._name(key)}: {exc}") from None
        return key

    def url(self, key: str, expires_at: float, base_url: str = "") -> str:
        seconds = max(1, min(MAX_PRESIGN_SECONDS, int(expires_at - time.time())))
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket,
                                                                        "Key": self._name(key)}, ExpiresIn=seconds)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))
        except Exception as exc:
            raise StoreError(f"could not delete s3://{self.bucket}/{self._name(key)}: {exc}") from None

    def _keys(self):
        paginator = self.client.get_paginator("list_objects_v2")
        prefix = f"{self.prefix}/" if self.prefix else ""
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"][len(prefix):]

    def sweep(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        n = 0
        for key in list(self._keys()):
            exp = expiry_of_key(key)
            if exp is not None and exp <= now:
                self.delete(key)
                n += 1
        return n

    def count(self) -> int:
        return sum(1 for k in self._keys() if expiry_of_key(k) is not None)
