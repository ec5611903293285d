"""The store a location names: `s3://bucket/prefix` or a directory."""

from __future__ import annotations

from loraplex.adapters.store import AdapterStore, DirectoryStore


def open_store(location: str) -> AdapterStore:
    """The store at `location`: `s3://bucket/prefix` (needs boto3) or a directory."""
    if location.startswith("s3://"):
        from loraplex.adapters.store_s3 import S3Store  # boto3 only when asked for

        return S3Store.from_url(location)
    return DirectoryStore(location)
