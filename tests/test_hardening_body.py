"""A client that sends its body slowly is answered within request_timeout_s (a 400 saying so) instead of
holding a connection, and the server's drain, for as long as it likes."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from tests.lifecycle_support import upload
from tests.live_server import LiveServer
from tests.peft_factory import save_peft_adapter

TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("store"))
    with LiveServer("--adapter-store", store, "--request-timeout-s", str(TIMEOUT_S)) as srv:
        yield srv


def _stalled_request(port: int, path: str, sent: bytes, length: int) -> tuple[int, dict]:
    """Send the head and part of the body, then nothing: the status and body of the server's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n"
        )
        sock.sendall(head.encode() + sent)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


@pytest.mark.parametrize("path", ["/classify", "/embed", "/rerank"])
def test_a_stalled_body_gets_a_400_naming_the_timeout(server, path):
    status, body = _stalled_request(server.port, path, b'{"adapter_id": "x", "in', 400)
    assert status == 400, body
    assert body["error_type"] == "bad_request" and "request_timeout_s" in body["error"], body
    # The server is unharmed and answers the next request in full.
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    ok = httpx.post(server.url + "/embed", json={"inputs": "hello"}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_uploads_past_the_concurrency_bound_get_429_with_retry_after(tmp_path):
    """One upload whose body the client holds back takes the only upload place of the worker: another
    upload gets 429 with Retry-After, without its body being read; once the first is done, uploads go on."""
    folder = save_peft_adapter(tmp_path / "a", seed=3)
    store = tmp_path / "store"
    srv = LiveServer("--workers", "1", "--adapter-store", str(store), "--max-concurrent-uploads", "1")
    with srv, httpx.Client(base_url=srv.url, timeout=120) as client:
        files = {
            "adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
            "adapter_model": (
                "adapter_model.safetensors",
                (folder / "adapter_model.safetensors").read_bytes(),
            ),
        }
        request = client.build_request("PUT", "/adapters/held", files=files)
        body = request.read()
        go_on = threading.Event()

        def held_body():
            yield body[:100]
            assert go_on.wait(120)
            yield body[100:]

        headers = {"content-type": request.headers["content-type"], "content-length": str(len(body))}
        results = []
        first = threading.Thread(
            target=lambda: results.append(client.put("/adapters/held", content=held_body(), headers=headers))
        )
        first.start()
        try:
            # Until the server has begun the held upload, a bodiless PUT gets 415; from then on, 429.
            deadline = time.monotonic() + 120
            while (refused := client.put("/adapters/other")).status_code == 415:
                assert time.monotonic() < deadline, "the held upload never started"
                time.sleep(0.05)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error_type"] == "overloaded" and int(refused.headers["retry-after"]) > 0
            assert upload(client, "other", folder).status_code == 429  # a whole upload too
        finally:
            go_on.set()
            first.join(120)
        assert results[0].status_code == 201, results[0].text
        assert upload(client, "other", folder).status_code == 201
