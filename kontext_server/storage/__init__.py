"""Where output images live until they expire: the `OutputStore` protocol (base.py), local files served through
signed URLs (local.py, signing.py) and S3-compatible buckets with presigned URLs (s3.py). `open_output_store` picks
one from the `--output-store` setting. Imports nothing of the HTTP layer."""
from kontext_server.storage.base import OutputStore, StoreError, object_key, expiry_of_key
from kontext_server.storage.factory import open_output_store

__all__ = ["OutputStore", "StoreError", "expiry_of_key", "object_key", "open_output_store"]
