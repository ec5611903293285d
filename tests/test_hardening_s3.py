"""An S3 server without conditional writes: the store learns it from the first 501 and asks plainly after.

The server is moto's on loopback behind a small proxy that answers 501 NotImplemented to every PUT or
DELETE carrying If-Match or If-None-Match, as S3-compatible servers without conditional writes do,
and forwards everything else.
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


class NoConditionalWrites:
    """A proxy to `upstream` that refuses conditional PUTs and DELETEs with 501; counts what it saw."""

    def __init__(self, upstream: str):
        self.upstream = upstream
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
                if self.command in ("PUT", "DELETE"):
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
