"""The store a location names: `s3://bucket/prefix` or a directory."""

from __future__ import annotations

from loraplex.adapters.store import AdapterStore, DirectoryStore


def open_store(location: str, max_file_bytes: int | None = None) -> AdapterStore:
    """The store at `location`: `s3://bucket/prefix` (needs boto3) or a directory. `max_file_bytes`: the
    largest file a read returns (the upload limit), past which the entry is refused as damaged."""
    if location.startswith("s3://"):
        from loraplex.adapters.store_s3 import S3Store  # boto3 only when asked for

        store: AdapterStore = S3Store.from_url(location)
    else:
        store = DirectoryStore(location)
    store.max_file_bytes = max_file_bytes
    return store
