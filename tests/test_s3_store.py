"""The S3 adapter store against a real S3 server on loopback (moto's standalone server)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest

from loraplex.adapters.errors import NotFoundError, UnavailableError
from loraplex.adapters.store import AdapterFiles, AdapterRecord, utc_now
from loraplex.adapters.store_s3 import S3Store, make_client, parse_s3_url

pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, s3_endpoint):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_endpoint


_bucket_counter = iter(range(10_000))


@pytest.fixture
def bucket(aws_env):
    name = f"loraplex-test-{next(_bucket_counter)}"
    make_client().create_bucket(Bucket=name)
    return name


def files_and_record(adapter_id: str, seed: int, labels=("neg", "pos")) -> tuple[AdapterRecord, AdapterFiles]:
    files = AdapterFiles(
        config=json.dumps({"r": 8, "seed": seed}).encode(),
        model=bytes([seed % 256]) * 1000 + seed.to_bytes(4, "little"),
        labels=tuple(labels),
    )
    record = AdapterRecord(
        adapter_id=adapter_id,
        version=files.version(),
        sha256="0" * 64,
        rank=8,
        lora_alpha=16.0,
        target_modules=("query", "value"),
        labels=tuple(labels),
        size_bytes=len(files.model),
        created_at=utc_now(),
    )
    return record, files


def keys(bucket: str, prefix: str = "") -> list[str]:
    listing = make_client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", ()))


class Recording:
    """The real boto3 client, with a log of the write operations and an optional hook before one of them."""

    def __init__(self, client, before: dict | None = None):
        self._client = client
        self.calls: list[tuple[str, str]] = []
        self.before = before or {}

    def __getattr__(self, name):
        method = getattr(self._client, name)

        def call(**kwargs):
            key = kwargs.get("Key", "")
            if name in ("put_object", "delete_object"):
                self.calls.append((name, key))
                hook = self.before.get((name, key.rsplit("/", 1)[-1]))
                if hook is not None:
                    self.before.pop((name, key.rsplit("/", 1)[-1]))
                    hook()
            return method(**kwargs)

        return call


def test_url_parsing():
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    assert parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b/")
    for bad in ("bucket/x", "s3:///x", "file:///tmp/x", "s3://bucket/x?versionId=1"):
        with pytest.raises(ValueError, match="s3://BUCKET"):
            parse_s3_url(bad)


def test_put_get_read_list_delete(bucket):
    store = S3Store.from_url(f"s3://{bucket}/team/store")
    record, files = files_and_record("sentiment", 1)
    assert store.get("sentiment") is None
    assert store.put(record, files) == (record, True)

    fresh = S3Store.from_url(f"s3://{bucket}/team/store")  # another replica: nothing cached
    assert fresh.get("sentiment") == record
    assert fresh.read("sentiment", record.version) == files
    assert [r.adapter_id for r in fresh.list()] == ["sentiment"]
    assert all(key.startswith("team/store/adapters/sentiment/") for key in keys(bucket))

    # The same content again keeps the stored record (same version, same created_at).
    again, _ = files_and_record("sentiment", 1)
    again = AdapterRecord(**{**again.__dict__, "created_at": "2000-01-01T00:00:00Z"})
    assert store.put(again, files) == (record, False)

    # A replacement is a new version; the old one's files are removed, reads of it say so.
    record2, files2 = files_and_record("sentiment", 2, labels=("a", "b", "c"))
    assert store.put(record2, files2) == (record2, False)
    assert fresh.get("sentiment") == record2
    assert fresh.read("sentiment", record2.version).labels == ("a", "b", "c")
    with pytest.raises(NotFoundError, match="no longer stored"):
        fresh.read("sentiment", record.version)
    folders = {key.rsplit("/", 2)[1] for key in keys(bucket) if not key.endswith("manifest.json")}
    assert len(folders) == 1 and folders.pop().startswith(record2.version)

    assert fresh.delete("sentiment") is True
    assert store.get("sentiment") is None
    assert store.delete("sentiment") is False
    assert store.list() == []
    assert keys(bucket) == []
    with pytest.raises(NotFoundError):
        store.read("sentiment", record2.version)


def test_weights_are_written_before_the_manifest(bucket):
    client = Recording(make_client())
    store = S3Store(bucket, "p", client)
    record, files = files_and_record("ordered", 3)
    store.put(record, files)
    puts = [key.rsplit("/", 1)[-1] for op, key in client.calls if op == "put_object"]
    assert puts == ["adapter_config.json", "adapter_model.safetensors", "labels.json", "manifest.json"]


def test_a_write_that_dies_before_the_manifest_leaves_the_old_version(bucket):
    store = S3Store(bucket, "", make_client(), orphan_age_s=0.0)
    old, old_files = files_and_record("crashy", 4)
    store.put(old, old_files)

    def crash():
        raise KeyboardInterrupt("process killed")

    dying = S3Store(bucket, "", Recording(make_client(), before={("put_object", "manifest.json"): crash}))
    new, new_files = files_and_record("crashy", 5)
    with pytest.raises(KeyboardInterrupt):
        dying.put(new, new_files)

    reader = S3Store(bucket, "", make_client())
    assert reader.get("crashy") == old
    assert reader.read("crashy", old.version) == old_files
    assert len(keys(bucket)) == 7  # manifest + the old version + the unnamed new files

    # The next write of that id removes the left-over files (they are older than orphan_age_s).
    newer, newer_files = files_and_record("crashy", 6)
    store.put(newer, newer_files)
    assert len(keys(bucket)) == 4
    assert reader.read("crashy", newer.version) == newer_files


def test_concurrent_create_is_a_compare_and_swap(bucket):
    other = S3Store(bucket, "", make_client())
    theirs, their_files = files_and_record("race", 7)
    ours, our_files = files_and_record("race", 8)
    answers = {}

    def other_creates_first():
        answers["other"] = other.put(theirs, their_files)

    store = S3Store(
        bucket, "", Recording(make_client(), before={("put_object", "manifest.json"): other_creates_first})
    )
    answers["ours"] = store.put(ours, our_files)
    # Both saw no adapter before writing, but only one of them created it: the other replaced it.
    assert answers["other"] == (theirs, True)
    assert answers["ours"] == (ours, False)
    assert other.get("race") == ours
    # The replaced version's files were removed; ours stay.
    assert len(keys(bucket)) == 4
    assert other.read("race", ours.version) == our_files


def test_concurrent_identical_uploads_keep_one_copy(bucket):
    other = S3Store(bucket, "", make_client())
    base, base_files = files_and_record("same", 9)
    S3Store(bucket, "", make_client()).put(base, base_files)
    new, new_files = files_and_record("same", 10)
    answers = {}

    def other_stores_it_first():
        answers["other"] = other.put(new, new_files)

    store = S3Store(
        bucket, "", Recording(make_client(), before={("put_object", "manifest.json"): other_stores_it_first})
    )
    answers["ours"] = store.put(new, new_files)
    assert answers["other"] == (new, False)
    assert answers["ours"] == (new, False)
    assert len(keys(bucket)) == 4  # one manifest, one copy of the version
    assert store.read("same", new.version) == new_files


def test_delete_racing_a_replace_removes_the_newest(bucket):
    store = S3Store(bucket, "", make_client())
    first, first_files = files_and_record("gone", 11)
    store.put(first, first_files)
    second, second_files = files_and_record("gone", 12)

    def replaced_meanwhile():
        S3Store(bucket, "", make_client()).put(second, second_files)

    deleter = S3Store(
        bucket, "", Recording(make_client(), before={("delete_object", "manifest.json"): replaced_meanwhile})
    )
    assert deleter.delete("gone") is True
    assert store.get("gone") is None
    assert keys(bucket) == []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def silent_server():
    """A TCP server that accepts connections and never answers: a hung store."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def test_unreachable_store_is_unavailable_quickly(aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    store = S3Store("bucket", "", make_client())
    record, files = files_and_record("x", 13)
    start = time.monotonic()
    for attempt in (lambda: store.get("x"), lambda: store.put(record, files), store.list):
        with pytest.raises(UnavailableError) as info:
            attempt()
        assert info.value.retry_after and info.value.retry_after > 0
        assert "could not be reached" in info.value.message
    assert time.monotonic() - start < 10


def test_hung_store_is_bounded_by_the_timeouts(aws_env, monkeypatch):
    with silent_server() as port:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        store = S3Store("bucket", "", make_client(connect_timeout_s=0.5, read_timeout_s=0.5))
        start = time.monotonic()
        with pytest.raises(UnavailableError, match="could not be reached"):
            store.get("x")
        # Two attempts of at most 0.5 s each, plus the retry back-off.
        assert time.monotonic() - start < 5


def test_missing_bucket_is_named(aws_env):
    store = S3Store("no-such-bucket-here", "", make_client())
    with pytest.raises(UnavailableError, match="no-such-bucket-here"):
        store.get("x")
