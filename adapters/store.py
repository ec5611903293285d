"""Durable adapter storage: immutable content-hash versions per adapter id, plus a manifest written last.

`AdapterStore` is the one interface every reader and writer goes through (the registry, the HTTP routes,
tools); `DirectoryStore` keeps it in a directory that several server processes may share:

    DIR/
      adapters/<id>/manifest.json                   the current version of <id> (its AdapterRecord)
      adapters/<id>/<version>/adapter_config.json   immutable once renamed into place
      adapters/<id>/<version>/adapter_model.safetensors
      adapters/<id>/<version>/labels.json
      tmp/<id>~<random>/                            a version being written
      locks/<id>.lock                               flock()ed by whoever changes <id>

A write goes temp directory -> fsync -> rename into place -> manifest (temp file, fsync, rename) -> fsync
of the directories, so a crash at any point leaves the old manifest or the new one, never a manifest that
names a partial version. Writers of one id are serialised by an exclusive flock on its lock file; that holds
across threads and across processes on the same host and filesystem.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from loraplex.adapters.errors import DamagedAdapterError, InvalidAdapterError, NotFoundError

log = logging.getLogger("loraplex.store")

ADAPTER_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
CONFIG_NAME = "adapter_config.json"
MODEL_NAME = "adapter_model.safetensors"
LABELS_NAME = "labels.json"
# PEFT's task types that loraplex serves (the same names as in loraplex.adapters.peft, which needs torch).
FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", FEATURE_EXTRACTION)
MANIFEST_NAME = "manifest.json"
VERSION_LEN = 12  # hex digits of the content hash shown as `version`
VERSION_RE = re.compile(rf"^[0-9a-f]{{{VERSION_LEN}}}$")


def check_adapter_id(adapter_id: str) -> str:
    """Return `adapter_id` if it matches the contract's allowlist, else raise InvalidAdapterError."""
    if not isinstance(adapter_id, str) or not ADAPTER_ID_RE.fullmatch(adapter_id):
        shown = adapter_id if isinstance(adapter_id, str) and len(adapter_id) <= 80 else "the given id"
        raise InvalidAdapterError(
            f"Adapter id {shown!r} is not allowed: use 1 to 64 characters from a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or digit."
        )
    return adapter_id


@dataclass(frozen=True)
class AdapterFiles:
    """The stored content of one adapter version."""

    config: bytes  # adapter_config.json as uploaded
    model: bytes  # adapter_model.safetensors as uploaded
    labels: tuple[str, ...]  # in head order

    def version(self) -> str:
        """Content hash: equal content gives an equal version, any change gives a new one."""
        digest = hashlib.sha256()
        for part in (self.config, self.model, json.dumps(list(self.labels)).encode()):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
        return digest.hexdigest()[:VERSION_LEN]


@dataclass(frozen=True)
class AdapterRecord:
    """What a manifest says about the current version of an adapter (AdapterInfo without `resident`)."""

    adapter_id: str
    version: str
    sha256: str  # of adapter_model.safetensors
    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    labels: tuple[str, ...]
    size_bytes: int  # of adapter_model.safetensors
    created_at: str  # ISO 8601 UTC, when this version was first stored
    # PEFT's task_type (SEQ_CLS, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION): which route serves it.
    # None: a manifest written before manifests recorded it, with labels (uploading it again records it).
    task_type: str | None = None

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_json(self) -> dict:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["labels"] = list(self.labels)
        data["num_labels"] = self.num_labels
        alpha = float(self.lora_alpha)
        data["lora_alpha"] = int(alpha) if alpha.is_integer() else alpha
        return data

    @classmethod
    def from_json(cls, data: dict) -> AdapterRecord:
        return cls(
            adapter_id=str(data["adapter_id"]),
            version=str(data["version"]),
            sha256=str(data["sha256"]),
            rank=int(data["rank"]),
            lora_alpha=float(data["lora_alpha"]),
            target_modules=tuple(str(t) for t in data["target_modules"]),
            labels=tuple(str(label) for label in data["labels"]),
            size_bytes=int(data["size_bytes"]),
            created_at=str(data["created_at"]),
            task_type=data.get("task_type"),
        )


def parse_manifest(raw: bytes, adapter_id: str) -> tuple[AdapterRecord, dict]:
    """The record in a manifest read from the store, and its JSON; ValueError saying what is wrong with it.

    The store is shared and outlives versions of this server, so nothing in it is trusted: the manifest
    must be a JSON object of the expected fields and types, name `adapter_id` and a well-formed version.
    """
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"its manifest is not JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ValueError("its manifest is not a JSON object")
    kinds = {
        "adapter_id": str, "version": str, "sha256": str, "rank": int, "lora_alpha": (int, float),
        "target_modules": list, "labels": list, "size_bytes": int, "created_at": str,
    }  # fmt: skip
    for name, kind in kinds.items():
        value = data.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"its manifest has no valid {name!r}")
    if data["adapter_id"] != adapter_id:
        raise ValueError(f"its manifest names another adapter ({data['adapter_id'][:80]!r})")
    if not VERSION_RE.fullmatch(data["version"]):
        raise ValueError("its manifest's version is not a content hash")
    for name in ("target_modules", "labels"):
        if not all(isinstance(item, str) for item in data[name]):
            raise ValueError(f"its manifest's {name!r} is not a list of strings")
    if data["rank"] < 1:
        raise ValueError("its manifest has no rank")
    task_type = data.get("task_type")
    if task_type is None and not data["labels"]:
        # Written before manifests recorded the task: only an embedding adapter has no labels.
        data = {**data, "task_type": FEATURE_EXTRACTION}
    elif task_type is not None and task_type not in TASK_TYPES:
        raise ValueError("its manifest's 'task_type' is not one of " + ", ".join(TASK_TYPES))
    if bool(data["labels"]) == (data.get("task_type") == FEATURE_EXTRACTION):
        raise ValueError("its manifest's labels do not fit its task (labels for every task but embeddings)")
    return AdapterRecord.from_json(data), data


def parse_stored_labels(raw: bytes) -> tuple[str, ...]:
    """The labels file of a stored version; ValueError when it is not a JSON list of strings (empty for an
    embedding adapter: whether the labels fit the head is checked with the weights)."""
    try:
        labels = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"its {LABELS_NAME} is not JSON") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"its {LABELS_NAME} is not a list of label names")
    return tuple(labels)


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class AdapterStore(ABC):
    """Where adapters live between uploads, restarts and replicas. Methods block: call them off the loop.

    What a store holds is input: a damaged or foreign manifest, labels file or weights makes `get` and
    `read` raise DamagedAdapterError (409) for that id, and `list` skip it; each one met is logged and
    counted in `damaged`.
    """

    damaged = 0  # damaged or foreign entries met (skipped in a listing, or refused for a request)
    # Largest file `read` returns (None: no limit): a foreign object is refused, never loaded whole.
    max_file_bytes: int | None = None
    _warned: frozenset[tuple[str, str]] = frozenset()  # (adapter_id, reason) already logged as warnings

    def damaged_error(self, adapter_id: str, reason: str) -> DamagedAdapterError:
        """Count a damaged entry, log it (a warning the first time); the error that a request for it gets."""
        self.damaged += 1
        seen = (adapter_id, reason) in self._warned
        self._warned = self._warned | {(adapter_id, reason)}
        level = logging.DEBUG if seen else logging.WARNING
        log.log(level, "adapter %r in %r is damaged and skipped: %s", adapter_id, self, reason)
        return DamagedAdapterError(
            f"Adapter {adapter_id!r} cannot be served: what the adapter store holds for it is damaged or "
            f"was written by something else ({reason}). Upload it again or delete it."
        )

    @abstractmethod
    def put(self, record: AdapterRecord, files: AdapterFiles) -> tuple[AdapterRecord, bool]:
        """Make `files` the current version of `record.adapter_id`; last writer wins.

        Returns the stored record and whether the id was created (False: replaced). Storing the content
        that is already current keeps the existing record (same version, same created_at).
        """

    @abstractmethod
    def get(self, adapter_id: str) -> AdapterRecord | None:
        """The current record of `adapter_id`, or None if there is none."""

    @abstractmethod
    def list(self) -> list[AdapterRecord]:
        """Current records of every stored adapter, sorted by id; damaged ones are skipped."""

    @abstractmethod
    def read(self, adapter_id: str, version: str) -> AdapterFiles:
        """The content of one version; NotFoundError if it is gone (deleted or replaced meanwhile)."""

    @abstractmethod
    def delete(self, adapter_id: str) -> bool:
        """Remove `adapter_id` and all its versions; False if it did not exist."""


class DirectoryStore(AdapterStore):
    """An AdapterStore in a local directory, safe for several threads and processes sharing it."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self._adapters = self.root / "adapters"
        self._tmp = self.root / "tmp"
        self._locks = self.root / "locks"
        for path in (self._adapters, self._tmp, self._locks):
            path.mkdir(parents=True, exist_ok=True)
        self.recover()

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.root)!r})"

    # --- reads -------------------------------------------------------------------------------------

    def get(self, adapter_id: str) -> AdapterRecord | None:
        check_adapter_id(adapter_id)
        try:
            raw = (self._adapters / adapter_id / MANIFEST_NAME).read_bytes()
            return parse_manifest(raw, adapter_id)[0]
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise self.damaged_error(adapter_id, _reason(exc)) from None

    def list(self) -> list[AdapterRecord]:
        records = []
        for entry in sorted(os.listdir(self._adapters)):
            if ADAPTER_ID_RE.fullmatch(entry):
                with contextlib.suppress(DamagedAdapterError):  # logged and counted by get()
                    if (record := self.get(entry)) is not None:
                        records.append(record)
        return records

    def read(self, adapter_id: str, version: str) -> AdapterFiles:
        check_adapter_id(adapter_id)
        if not VERSION_RE.fullmatch(version):
            raise NotFoundError(f"Adapter {adapter_id!r} has no version {version[:80]!r}.")
        folder = self._adapters / adapter_id / version
        try:
            return AdapterFiles(
                config=self._read_capped(folder / CONFIG_NAME),
                model=self._read_capped(folder / MODEL_NAME),
                labels=parse_stored_labels(self._read_capped(folder / LABELS_NAME)),
            )
        except FileNotFoundError:
            raise NotFoundError(f"Adapter {adapter_id!r} version {version} is no longer stored.") from None
        except (OSError, ValueError) as exc:
            raise self.damaged_error(adapter_id, _reason(exc)) from None

    def _read_capped(self, path: Path) -> bytes:
        """The file's bytes, read no further than `max_file_bytes` + 1; ValueError past the limit."""
        with open(path, "rb") as file:
            data = file.read() if self.max_file_bytes is None else file.read(self.max_file_bytes + 1)
        if self.max_file_bytes is not None and len(data) > self.max_file_bytes:
            raise ValueError(f"{path.name} is over the limit of {self.max_file_bytes} bytes")
        return data

    # --- writes ------------------------------------------------------------------------------------

    def put(self, record: AdapterRecord, files: AdapterFiles) -> tuple[AdapterRecord, bool]:
        adapter_id = check_adapter_id(record.adapter_id)
        if record.version != files.version():
            raise ValueError("record.version must be files.version()")
        with self._locked(adapter_id):
            try:
                previous = self.get(adapter_id)
            except DamagedAdapterError:  # an upload is how a damaged adapter is repaired
                previous = None
            if previous is not None and previous.version == record.version:
                return previous, False
            folder = self._adapters / adapter_id
            folder.mkdir(exist_ok=True)
            target = folder / record.version
            if not target.is_dir():
                staging = self._tmp / f"{adapter_id}~{secrets.token_hex(8)}"
                staging.mkdir()
                _write_durably(staging / CONFIG_NAME, files.config)
                _write_durably(staging / MODEL_NAME, files.model)
                _write_durably(staging / LABELS_NAME, json.dumps(list(files.labels)).encode())
                _fsync_dir(staging)
                os.rename(staging, target)
                _fsync_dir(self._tmp)
            manifest_tmp = self._tmp / f"{adapter_id}~{secrets.token_hex(8)}.manifest"
            _write_durably(manifest_tmp, json.dumps(record.to_json(), indent=1).encode())
            os.replace(manifest_tmp, folder / MANIFEST_NAME)
            _fsync_dir(folder)
            _fsync_dir(self._adapters)
            self._drop_unreferenced_versions(adapter_id, keep=record.version)
            return record, previous is None

    def delete(self, adapter_id: str) -> bool:
        check_adapter_id(adapter_id)
        with self._locked(adapter_id):
            folder = self._adapters / adapter_id
            try:
                os.unlink(folder / MANIFEST_NAME)
            except FileNotFoundError:
                return False
            _fsync_dir(folder)
            self._drop_unreferenced_versions(adapter_id, keep=None)
            return True

    def recover(self) -> None:
        """Remove what interrupted writers left behind; an id being written by a live writer is skipped."""
        for entry in sorted(os.listdir(self._tmp)):
            adapter_id = entry.split("~", 1)[0]
            if not ADAPTER_ID_RE.fullmatch(adapter_id):
                continue
            with self._locked(adapter_id, blocking=False) as held:
                if held:
                    _remove(self._tmp / entry)
        for adapter_id in sorted(os.listdir(self._adapters)):
            if ADAPTER_ID_RE.fullmatch(adapter_id):
                with self._locked(adapter_id, blocking=False) as held:
                    if held:
                        try:
                            current = self.get(adapter_id)
                        except DamagedAdapterError:
                            continue  # which version is current is unknown: keep every one
                        self._drop_unreferenced_versions(adapter_id, keep=current and current.version)

    # --- helpers -----------------------------------------------------------------------------------

    def _drop_unreferenced_versions(self, adapter_id: str, keep: str | None) -> None:
        # A replica that read the old manifest just before this may still try to read the old version; it
        # gets NotFoundError from read() and re-resolves the manifest.
        folder = self._adapters / adapter_id
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(folder):
                if entry not in (keep, MANIFEST_NAME):
                    _remove(folder / entry)
        if keep is None:
            with contextlib.suppress(OSError):
                folder.rmdir()

    @contextlib.contextmanager
    def _locked(self, adapter_id: str, blocking: bool = True) -> Iterator[bool]:
        fd = os.open(self._locks / f"{adapter_id}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing the descriptor releases the lock


def _reason(exc: Exception) -> str:
    """Why an entry is damaged: a ValueError's own words, or the kind of read that failed."""
    return str(exc) if isinstance(exc, ValueError) else f"it could not be read ({type(exc).__name__})"


def _write_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
