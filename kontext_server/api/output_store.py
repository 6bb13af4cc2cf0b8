"""Where `response_format: "url"` images and async jobs' samples go: the `OutputStore` protocol
(kontext_server/storage/base.py), re-exported here for the HTTP layer.

Every app has one: local files under the data directory behind signed, expiring `/v1/files/...` URLs by default, or an
S3-compatible bucket with presigned URLs (`--output-store s3://bucket/prefix`). Objects expire with the result that
points at them (`--result-ttl`) and are deleted by the job manager's sweeper."""
from kontext_server.storage.base import OutputStore

__all__ = ["OutputStore"]
