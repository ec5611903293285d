"""An `AdapterStore` in an S3 bucket (AWS S3 or any S3-compatible server), for replicas without a shared disk.

`--adapter-store s3://BUCKET/PREFIX` keeps the layout of the directory store under PREFIX:

    PREFIX/adapters/<id>/manifest.json                      the current version of <id> (its AdapterRecord)
    PREFIX/adapters/<id>/<version>.<nonce>/adapter_config.json
    PREFIX/adapters/<id>/<version>.<nonce>/adapter_model.safetensors
    PREFIX/adapters/<id>/<version>.<nonce>/labels.json

A write puts the three files of a version under a folder of its own (the nonce makes it unique to this
write, so no other writer or deleter ever touches it), then swaps the manifest to name that folder. S3
writes whole objects atomically, so readers see the old manifest or the new one, and a manifest only ever
names a folder whose files were all written before it. The manifest swap is a compare-and-swap where the
server offers conditional writes (`If-Match` on the ETag read, `If-None-Match: *` when there was none):
two replicas writing the same id at once both land in order instead of losing each other's `created`
answer or deleting each other's files. Servers without conditional writes get plain last-writer-wins.

Every request has a bounded connect/read timeout and a bounded number of attempts. When the store cannot be
reached, methods raise `UnavailableError` with a `retry_after`, which the HTTP layer answers with 503 and
`Retry-After`; adapters already loaded on a replica keep serving from its memory.

Credentials, region and endpoint come from boto3's usual sources (environment, config files, instance
role). `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` point it at an S3-compatible server (MinIO, Ceph, ...);
such servers are then addressed path-style.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from loraplex.adapters.errors import ConflictError, DamagedAdapterError, NotFoundError, UnavailableError
from loraplex.adapters.store import (
    ADAPTER_ID_RE,
    CONFIG_NAME,
    LABELS_NAME,
    MANIFEST_NAME,
    MODEL_NAME,
    AdapterFiles,
    AdapterRecord,
    AdapterStore,
    check_adapter_id,
    parse_manifest,
    parse_stored_labels,
)

log = logging.getLogger("loraplex.store")

CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 10.0
MAX_ATTEMPTS = 2  # per request, first try included
RETRY_AFTER_S = 5
MANIFEST_SWAP_TRIES = 8  # compare-and-swap rounds before a write under heavy contention gives up with 409
PUT_NEW_TRIES = 3  # conditional writes of a new object that conflicted (409) and stored nothing
LIST_THREADS = 8  # manifests a listing reads at once
ORPHAN_AGE_S = 3600.0  # a folder no manifest names, older than this, is left over from a crashed write
OBJECTS_KEY = "objects"  # manifest field naming the folder of the current version

_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_NOT_IMPLEMENTED_CODES = {"NotImplemented", "501"}
_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "403"}


class _Missing(Exception):
    pass


class _PreconditionFailed(Exception):
    pass


class _NotImplemented(Exception):
    pass


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/"); the prefix may be empty."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"{url!r} is not an adapter store URL; use s3://BUCKET or s3://BUCKET/PREFIX")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


def make_client(
    *, connect_timeout_s: float = CONNECT_TIMEOUT_S, read_timeout_s: float = READ_TIMEOUT_S
) -> Any:
    """A boto3 S3 client whose every request is bounded in time and in attempts."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise RuntimeError(
            "An s3:// adapter store needs boto3; install it with: pip install 'loraplex[s3]'"
        ) from None
    s3_options = {}
    if os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
        s3_options["addressing_style"] = "path"
    config = Config(
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        s3=s3_options,
    )
    return boto3.session.Session().client("s3", config=config)


class S3Store(AdapterStore):
    """An AdapterStore in `s3://bucket/prefix`, safe for any number of replicas sharing it."""

    def __init__(self, bucket: str, prefix: str = "", client: Any = None, orphan_age_s: float = ORPHAN_AGE_S):
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = client if client is not None else make_client()
        self.orphan_age_s = orphan_age_s
        # cleared when the server answers that it does not implement conditional puts / deletes
        self._conditional_put = True
        self._conditional_delete = True
        # adapter id -> (version, folder) last seen in its manifest, so that read() after get() costs no
        # extra manifest request
        self._folders: dict[str, tuple[str, str]] = {}

    @classmethod
    def from_url(cls, url: str, client: Any = None) -> S3Store:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, client)

    def __repr__(self) -> str:
        return f"S3Store('s3://{self.bucket}/{self.prefix}')"

    # --- reads -------------------------------------------------------------------------------------

    def get(self, adapter_id: str) -> AdapterRecord | None:
        check_adapter_id(adapter_id)
        found = self._read_manifest(adapter_id)
        return None if found is None else found[0]

    def list(self) -> list[AdapterRecord]:
        """One manifest GET per adapter, `LIST_THREADS` at a time."""

        def get(adapter_id: str) -> AdapterRecord | None:
            with contextlib.suppress(DamagedAdapterError):  # logged and counted by get()
                return self.get(adapter_id)
            return None

        ids = self._list_ids()
        if not ids:
            return []
        with ThreadPoolExecutor(min(LIST_THREADS, len(ids)), thread_name_prefix="loraplex-s3-list") as pool:
            return [record for record in pool.map(get, ids) if record is not None]

    def read(self, adapter_id: str, version: str) -> AdapterFiles:
        check_adapter_id(adapter_id)
        folder = self._folder_of(adapter_id, version)
        gone = NotFoundError(f"Adapter {adapter_id!r} version {version} is no longer stored.")
        if folder is None:
            raise gone
        try:
            config = self._get_bytes(f"{folder}/{CONFIG_NAME}")
            model = self._get_bytes(f"{folder}/{MODEL_NAME}")
            labels = parse_stored_labels(self._get_bytes(f"{folder}/{LABELS_NAME}"))
        except _Missing:
            self._folders.pop(adapter_id, None)
            raise gone from None
        except ValueError as exc:
            raise self.damaged_error(adapter_id, str(exc)) from None
        return AdapterFiles(config=config, model=model, labels=labels)

    # --- writes ------------------------------------------------------------------------------------

    def put(self, record: AdapterRecord, files: AdapterFiles) -> tuple[AdapterRecord, bool]:
        adapter_id = check_adapter_id(record.adapter_id)
        if record.version != files.version():
            raise ValueError("record.version must be files.version()")
        current = self._read_manifest(adapter_id, damaged_ok=True)  # an upload repairs a damaged one
        if current is not None and current[0] is not None and current[0].version == record.version:
            return current[0], False
        folder = f"{self._id_prefix(adapter_id)}{record.version}.{secrets.token_hex(6)}"
        # Weights first, manifest last: a crash in between leaves only an unnamed folder (removed later).
        self._put_new(f"{folder}/{CONFIG_NAME}", files.config)
        self._put_new(f"{folder}/{MODEL_NAME}", files.model)
        self._put_new(f"{folder}/{LABELS_NAME}", json.dumps(list(files.labels)).encode())
        manifest = json.dumps({**record.to_json(), OBJECTS_KEY: folder}, indent=1).encode()
        for _ in range(MANIFEST_SWAP_TRIES):
            try:
                self._put_manifest(adapter_id, manifest, expected_etag=current and current[2])
            except _PreconditionFailed:
                latest = self._read_manifest(adapter_id, damaged_ok=True)
                if latest is not None and latest[1] == folder:
                    break  # our own write, answered late and retried by the client library
                if latest is not None and latest[0] is not None and latest[0].version == record.version:
                    # Another writer stored the same content meanwhile: keep theirs, drop our copy.
                    self._delete_folder(folder)
                    return latest[0], False
                current = latest
                continue
            break
        else:
            self._delete_folder(folder)
            raise ConflictError(f"Adapter {adapter_id!r} is changing under other writers; retry the upload.")
        self._folders[adapter_id] = (record.version, folder)
        self._collect_garbage(adapter_id, keep=folder, replaced=current and current[1])
        return record, current is None

    def delete(self, adapter_id: str) -> bool:
        check_adapter_id(adapter_id)
        current = self._read_manifest(adapter_id, damaged_ok=True)  # a damaged adapter can be deleted
        if current is None:
            return False
        for _ in range(MANIFEST_SWAP_TRIES):
            try:
                self._delete_manifest(adapter_id, expected_etag=current[2])
            except _PreconditionFailed:
                latest = self._read_manifest(adapter_id, damaged_ok=True)
                if latest is None:
                    break  # gone already: deleted by us (a retried request) or by another writer
                current = latest
                continue
            break
        else:
            raise ConflictError(f"Adapter {adapter_id!r} is changing under other writers; retry the delete.")
        self._folders.pop(adapter_id, None)
        self._collect_garbage(adapter_id, keep=None, replaced=current[1])
        return True

    # --- manifest ----------------------------------------------------------------------------------

    def _id_prefix(self, adapter_id: str) -> str:
        return f"{self.prefix}adapters/{adapter_id}/"

    def _manifest_key(self, adapter_id: str) -> str:
        return self._id_prefix(adapter_id) + MANIFEST_NAME

    def _read_manifest(
        self, adapter_id: str, damaged_ok: bool = False
    ) -> tuple[AdapterRecord | None, str | None, str] | None:
        """(record, folder, etag) of the current manifest, or None when there is none.

        A damaged manifest raises DamagedAdapterError, or with `damaged_ok` gives (None, None, etag):
        what a write that replaces or deletes it needs.
        """
        try:
            response = self._call("get_object", Bucket=self.bucket, Key=self._manifest_key(adapter_id))
            body = response["Body"].read()
        except _Missing:
            self._folders.pop(adapter_id, None)
            return None
        try:
            record, data = parse_manifest(body, adapter_id)
            folder = data.get(OBJECTS_KEY)
            prefix = f"{self._id_prefix(adapter_id)}{record.version}."
            if not isinstance(folder, str) or not folder.startswith(prefix) or "/" in folder[len(prefix) :]:
                raise ValueError("its manifest names no folder of this adapter's version")
        except ValueError as exc:
            self._folders.pop(adapter_id, None)
            if damaged_ok:
                return None, None, response["ETag"]
            raise self.damaged_error(adapter_id, str(exc)) from None
        self._folders[adapter_id] = (record.version, folder)
        return record, folder, response["ETag"]

    def _folder_of(self, adapter_id: str, version: str) -> str | None:
        known = self._folders.get(adapter_id)
        if known is not None and known[0] == version:
            return known[1]
        current = self._read_manifest(adapter_id)
        if current is None or current[0].version != version:
            return None
        return current[1]

    def _put_manifest(self, adapter_id: str, body: bytes, expected_etag: str | None) -> None:
        condition = {"IfMatch": expected_etag} if expected_etag else {"IfNoneMatch": "*"}
        self._put_conditionally(self._manifest_key(adapter_id), body, condition)

    def _delete_manifest(self, adapter_id: str, expected_etag: str) -> None:
        key = self._manifest_key(adapter_id)
        if self._conditional_delete:
            try:
                self._call("delete_object", Bucket=self.bucket, Key=key, IfMatch=expected_etag)
                return
            except _NotImplemented:
                log.warning("%r has no conditional deletes; a delete racing an upload may win", self)
                self._conditional_delete = False
            except _Missing:
                raise _PreconditionFailed() from None
        self._call("delete_object", Bucket=self.bucket, Key=key)

    def _put_new(self, key: str, body: bytes) -> None:
        """Write a key unique to this write. A refused condition means a retried request of ours stored it
        already (412) or a concurrent conditional request conflicted (409, nothing stored): the object is
        checked, and written again when it is not there."""
        for _ in range(PUT_NEW_TRIES):
            try:
                self._put_conditionally(key, body, {"IfNoneMatch": "*"})
                return
            except _PreconditionFailed:
                if self._stored_size(key) == len(body):
                    return
        raise self._unavailable(f"{key} could not be written: its conditional writes kept conflicting")

    def _stored_size(self, key: str) -> int | None:
        try:
            return int(self._call("head_object", Bucket=self.bucket, Key=key)["ContentLength"])
        except _Missing:
            return None

    def _put_conditionally(self, key: str, body: bytes, condition: dict[str, str]) -> None:
        if self._conditional_put:
            try:
                self._call("put_object", Bucket=self.bucket, Key=key, Body=body, **condition)
                return
            except _NotImplemented:
                log.warning("%r has no conditional writes; concurrent uploads fall back to last-wins", self)
                self._conditional_put = False
            except _Missing:  # If-Match on an object deleted meanwhile
                raise _PreconditionFailed() from None
        self._call("put_object", Bucket=self.bucket, Key=key, Body=body)

    # --- folders -----------------------------------------------------------------------------------

    def _list_ids(self) -> list[str]:
        ids = []
        for page in self._pages(f"{self.prefix}adapters/", delimiter="/"):
            for common in page.get("CommonPrefixes", ()):
                adapter_id = common["Prefix"][len(self.prefix) + len("adapters/") :].rstrip("/")
                ids.append(adapter_id)
        return sorted(i for i in ids if ADAPTER_ID_RE.fullmatch(i))

    def _collect_garbage(self, adapter_id: str, keep: str | None, replaced: str | None) -> None:
        """Remove the replaced folder now and any unnamed folder old enough to be left from a crash.

        Folders younger than `orphan_age_s` may belong to a write in progress on another replica and stay.
        A failure here only leaves garbage behind, so it is logged, not raised.
        """
        try:
            now = time.time()
            doomed: set[str] = set()
            for page in self._pages(self._id_prefix(adapter_id)):
                for item in page.get("Contents", ()):
                    key = item["Key"]
                    folder, _, name = key.rpartition("/")
                    if name == MANIFEST_NAME or folder == keep:
                        continue
                    age = now - item["LastModified"].timestamp()
                    if folder == replaced or age > self.orphan_age_s:
                        doomed.add(key)
            self._delete_keys(sorted(doomed))
        except UnavailableError as exc:
            log.warning("could not remove old files of adapter %r: %s", adapter_id, exc.message)

    def _delete_folder(self, folder: str) -> None:
        try:
            self._delete_keys([f"{folder}/{name}" for name in (CONFIG_NAME, MODEL_NAME, LABELS_NAME)])
        except UnavailableError as exc:
            log.warning("could not remove %s: %s", folder, exc.message)

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": key} for key in keys[start : start + 1000]]
            if chunk:
                self._call("delete_objects", Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})

    def _pages(self, prefix: str, delimiter: str | None = None):
        token = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if delimiter:
                kwargs["Delimiter"] = delimiter
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list_objects_v2", **kwargs)
            yield page
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def _get_bytes(self, key: str) -> bytes:
        return self._call("get_object", Bucket=self.bucket, Key=key, max_body=self.max_file_bytes)[
            "Body"
        ].read()

    # --- errors ------------------------------------------------------------------------------------

    def _call(self, operation: str, *, max_body: int | None = None, **kwargs: Any) -> Any:
        """One S3 request; store failures become typed errors the HTTP layer can answer. A body is read
        no further than `max_body` + 1 bytes: ValueError past that."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = getattr(self.client, operation)(**kwargs)
            if "Body" in response:
                # The body streams after the call returns; read it here so that its failures are mapped too.
                body = response["Body"]
                try:
                    data = body.read() if max_body is None else body.read(max_body + 1)
                finally:
                    body.close()
                if max_body is not None and len(data) > max_body:
                    raise ValueError(
                        f"{kwargs.get('Key', 'an object')} is over the limit of {max_body} bytes"
                    )
                response["Body"] = _ReadBody(data)
            return response
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _MISSING_CODES or (status == "404" and code != "NoSuchBucket"):
                raise _Missing() from None
            if code in _PRECONDITION_CODES or status in ("412", "409"):
                raise _PreconditionFailed() from None
            if code in _NOT_IMPLEMENTED_CODES or status == "501":
                raise _NotImplemented() from None
            if code == "NoSuchBucket":
                reason = f"bucket {self.bucket!r} does not exist"
            elif code in _ACCESS_CODES or status == "403":
                reason = f"it refused access ({code}); check the server's S3 credentials and permissions"
            else:
                reason = f"it answered {code or status}"
            raise self._unavailable(reason) from None
        except BotoCoreError as exc:
            raise self._unavailable(f"it could not be reached ({type(exc).__name__})") from None

    def _unavailable(self, reason: str) -> UnavailableError:
        message = (
            f"The adapter store s3://{self.bucket}/{self.prefix} is unavailable: {reason}. "
            f"Adapters already loaded keep serving; retry changes in {RETRY_AFTER_S} s."
        )
        log.warning("%s", message)
        return UnavailableError(message, retry_after=RETRY_AFTER_S)


class _ReadBody:
    """An already-read object body with the `.read()` of botocore's stream."""

    def __init__(self, data: bytes):
        self._data = data

    def read(self) -> bytes:
        return self._data
