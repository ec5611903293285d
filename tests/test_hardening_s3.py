"""S3 servers that answer otherwise than plain S3: moto's on loopback behind a small proxy.

Without conditional writes (501 NotImplemented to every PUT or DELETE carrying If-Match or If-None-Match,
as some S3-compatible servers answer) the store learns it from the first 501 and asks plainly after. A
409 ConditionalRequestConflict that stored nothing is not taken for "already stored". A listing reads
its manifests at once, a bounded number at a time.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.test_s3_store import files_and_record

pytest.importorskip("moto.server")

NOT_IMPLEMENTED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code><Message>A header you '
    b"provided implies functionality that is not implemented</Message></Error>"
)
CONDITIONS = ("if-match", "if-none-match")
HOP_HEADERS = ("host", "content-length", "transfer-encoding", "connection", "content-encoding")


CONFLICT = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ConditionalRequestConflict</Code><Message>A '
    b"conflicting conditional operation is currently in progress against this resource.</Message></Error>"
)


class NoConditionalWrites:
    """A proxy to `upstream` that refuses conditional PUTs and DELETEs with 501; counts what it saw.

    `intercept(method, path)`, when given, sees every request first and may answer it, as (status, body),
    instead of the proxy; with it, conditional writes are forwarded like the rest."""

    def __init__(self, upstream: str, intercept=None):
        self.upstream = upstream
        self.intercept = intercept
        self.refused: list[tuple[str, str]] = []  # (method, path) answered 501
        self.plain_writes: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                conditional = any(h in (k.lower() for k in self.headers) for h in CONDITIONS)
                answer = proxy.intercept(self.command, self.path) if proxy.intercept else None
                if answer is not None:
                    self.send_response(answer[0])
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(answer[1])))
                    self.end_headers()
                    self.wfile.write(answer[1])
                    return
                if self.command in ("PUT", "DELETE") and proxy.intercept is None:
                    if conditional:
                        proxy.refused.append((self.command, self.path))
                        self.send_response(501)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(NOT_IMPLEMENTED)))
                        self.end_headers()
                        self.wfile.write(NOT_IMPLEMENTED)
                        return
                    proxy.plain_writes.append((self.command, self.path))
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")
                }
                reply = httpx.request(
                    self.command, proxy.upstream + self.path, headers=headers, content=body, timeout=30
                )
                self.send_response(reply.status_code)
                for key, value in reply.headers.items():
                    if key.lower() not in (
                        "content-length",
                        "transfer-encoding",
                        "connection",
                        "content-encoding",
                    ):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(reply.content)))
                self.end_headers()
                self.wfile.write(reply.content)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def moto_url():
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    yield f"http://{host}:{port}"
    moto.stop()


def use_endpoint(monkeypatch, url: str) -> None:
    for name, value in {
        "AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)


@pytest.fixture
def proxy(monkeypatch):
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    proxy = NoConditionalWrites(f"http://{host}:{port}")
    for name, value in {
        "AWS_ENDPOINT_URL": proxy.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    yield proxy
    proxy.close()
    moto.stop()


def test_capability_flags_stay_cleared_after_a_501(proxy, caplog):
    from loraplex.adapters.store_s3 import S3Store, make_client

    make_client().create_bucket(Bucket="no-conditions")
    store = S3Store.from_url("s3://no-conditions/team")
    records = []
    for seed in range(4):  # creations and replacements of two ids
        record, files = files_and_record(f"a{seed % 2}", seed)
        assert store.put(record, files)[0] == record
        records.append(record)
    assert store.get("a0") == records[2] and store.get("a1") == records[3]
    assert store.delete("a0") is True and store.delete("a1") is True
    assert store.list() == []
    # One refused conditional PUT and one refused conditional DELETE, then plain requests only.
    assert [method for method, _ in proxy.refused] == ["PUT", "DELETE"]
    assert len([m for m, _ in proxy.plain_writes if m == "PUT"]) >= 4 * 4  # 3 files + manifest per put
    warnings = [r.getMessage() for r in caplog.records if "has no conditional" in r.getMessage()]
    assert len(warnings) == 2


def test_a_conflict_that_stored_nothing_is_written_again_not_taken_as_stored(moto_url, monkeypatch):
    """The first conditional PUT of the weights answers 409 and stores nothing: the store checks, writes
    again, and the version it names can be read back whole."""
    from loraplex.adapters.store_s3 import S3Store, make_client

    conflicts = []

    def intercept(method, path):
        if method == "PUT" and path.split("?")[0].endswith("/adapter_model.safetensors") and not conflicts:
            conflicts.append(path)
            return 409, CONFLICT
        return None

    proxy = NoConditionalWrites(moto_url, intercept)
    try:
        use_endpoint(monkeypatch, proxy.url)
        make_client().create_bucket(Bucket="conflicts")
        store = S3Store.from_url("s3://conflicts/team")
        record, files = files_and_record("a", 1)
        assert store.put(record, files)[0] == record
        assert len(conflicts) == 1
        assert S3Store.from_url("s3://conflicts/team").read("a", record.version).model == files.model
    finally:
        proxy.close()


def test_a_listing_reads_manifests_at_once_and_a_bounded_number_at_a_time(moto_url, monkeypatch):
    from loraplex.adapters.store_s3 import LIST_THREADS, S3Store, make_client

    use_endpoint(monkeypatch, moto_url)
    make_client().create_bucket(Bucket="many")
    writer = S3Store.from_url("s3://many/team")
    records = [writer.put(*files_and_record(f"a{i:02d}", i))[0] for i in range(3 * LIST_THREADS)]
    lock = threading.Lock()
    in_flight, most = [0], [0]
    together = threading.Barrier(4, timeout=120)  # four manifest reads must be in flight at once

    def intercept(method, path):
        if method == "GET" and path.split("?")[0].endswith("/manifest.json"):
            with lock:
                in_flight[0] += 1
                most[0] = max(most[0], in_flight[0])
            try:
                together.wait()
            finally:
                with lock:
                    in_flight[0] -= 1
        return None

    proxy = NoConditionalWrites(moto_url, intercept)
    try:
        use_endpoint(monkeypatch, proxy.url)
        assert S3Store.from_url("s3://many/team").list() == sorted(records, key=lambda r: r.adapter_id)
    finally:
        proxy.close()
    assert not together.broken, "the manifests were read one after another"
    assert 4 <= most[0] <= LIST_THREADS
