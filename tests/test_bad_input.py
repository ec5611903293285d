"""Malformed requests get the contract's error JSON with the right status, and the server stays correct."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
import torch

from tests.serving_support import LONG_TEXT, TEXTS, main_server, metrics, reference, scores_of

LIMIT = 262144  # --max-body-bytes of the main server
JSON = {"content-type": "application/json"}


def body(**fields) -> bytes:
    return json.dumps({"adapter_id": "sent", "inputs": "hello", **fields}).encode()


def without(field: str) -> bytes:
    data = {"adapter_id": "sent", "inputs": "hello"}
    del data[field]
    return json.dumps(data).encode()


def chunks(total: int):
    piece = b'{"adapter_id": "sent", "inputs": "' + b"a" * 16384
    sent = 0
    while sent < total:
        yield piece
        sent += len(piece)


def case(name, content, status, error_type, *, method="POST", path="/classify", headers=JSON):
    return pytest.param(method, path, headers, content, status, error_type, id=name)


CASES = [
    case("not-json", b"{", 400, "bad_request"),
    case("empty-body", b"", 400, "bad_request"),
    case("whitespace-body", b"  \n ", 400, "bad_request"),
    case("trailing-garbage", body() + b"x", 400, "bad_request"),
    case("invalid-utf8", b'{"adapter_id": "sent", "inputs": "\xff\xfe"}', 400, "bad_request"),
    case("nan-for-bool", b'{"adapter_id": "sent", "inputs": "x", "truncate": NaN}', 400, "bad_request"),
    case(
        "infinity-for-bool",
        b'{"adapter_id": "sent", "inputs": "x", "raw_scores": -Infinity}',
        400,
        "bad_request",
    ),
    case("deep-nesting", b"[" * 100000 + b"]" * 100000, 400, "bad_request"),
    case("top-level-list", b'["hello"]', 422, "validation"),
    case("top-level-string", b'"hello"', 422, "validation"),
    case("top-level-null", b"null", 422, "validation"),
    case("missing-adapter-id", without("adapter_id"), 422, "validation"),
    case("missing-inputs", without("inputs"), 422, "validation"),
    case("adapter-id-number", body(adapter_id=7), 422, "validation"),
    case("adapter-id-null", body(adapter_id=None), 422, "validation"),
    case("inputs-number", body(inputs=42), 422, "validation"),
    case("inputs-bool", body(inputs=True), 422, "validation"),
    case("inputs-null", body(inputs=None), 422, "validation"),
    case("inputs-object", body(inputs={"text": "hi"}), 422, "validation"),
    case("inputs-list-with-number", body(inputs=["hi", 3]), 422, "validation"),
    case("inputs-nested-list", body(inputs=[["hi"]]), 422, "validation"),
    case("inputs-empty-string", body(inputs=""), 422, "validation"),
    case("inputs-empty-list", body(inputs=[]), 422, "validation"),
    case("inputs-list-with-empty", body(inputs=["hi", ""]), 422, "validation"),
    case("client-batch-over-32", body(inputs=["hi"] * 33), 422, "validation"),
    case("lone-surrogate", b'{"adapter_id": "sent", "inputs": "a\\ud800b"}', 422, "validation"),
    case("lone-surrogate-in-list", b'{"adapter_id": "sent", "inputs": ["ok", "\\udfff"]}', 422, "validation"),
    case("nul-byte", body(inputs="a\u0000b"), 422, "validation"),
    case("truncate-string", body(truncate="yes"), 422, "validation"),
    case("truncate-number", body(truncate=1), 422, "validation"),
    case(
        "raw-scores-huge-number",
        b'{"adapter_id": "sent", "inputs": "x", "raw_scores": 1e999}',
        422,
        "validation",
    ),
    case("unknown-field", body(temperature=0.5), 422, "validation"),
    case("too-long-without-truncate", body(inputs=LONG_TEXT, truncate=False), 422, "validation"),
    case("adapter-header-mismatch", body(), 422, "validation", headers={**JSON, "x-adapter-id": "tox"}),
    case("adapter-overflows-float32", body(adapter_id="overflow"), 409, "conflict"),
    case("unknown-adapter", body(adapter_id="nope"), 404, "not_found"),
    case("adapter-id-traversal", body(adapter_id="../../etc/passwd"), 404, "not_found"),
    case("adapter-id-empty", body(adapter_id=""), 404, "not_found"),
    case("adapter-id-lone-surrogate", b'{"adapter_id": "\\ud800", "inputs": "x"}', 422, "validation"),
    case("adapter-id-huge", body(adapter_id="a" * 100000), 422, "validation"),
    case("text-plain", body(), 415, "unsupported_media_type", headers={"content-type": "text/plain"}),
    case(
        "form-encoded",
        b"a=b",
        415,
        "unsupported_media_type",
        headers={"content-type": "application/x-www-form-urlencoded"},
    ),
    case(
        "multipart",
        b"--x--",
        415,
        "unsupported_media_type",
        headers={"content-type": "multipart/form-data; boundary=x"},
    ),
    case("body-over-limit", body(inputs="a" * LIMIT), 413, "payload_too_large"),
    case("chunked-over-limit", chunks, 413, "payload_too_large"),
    case("get-classify", None, 405, "bad_request", method="GET", headers={}),
    case("put-classify", body(), 405, "bad_request", method="PUT"),
    case("post-health", b"{}", 405, "bad_request", path="/health"),
    case("unknown-route", None, 404, "not_found", method="GET", path="/v1/predict", headers={}),
    case("unknown-route-post", body(), 404, "not_found", path="/classify/extra"),
]


@pytest.fixture(scope="module")
def srv():
    return main_server()


@pytest.mark.parametrize("method, path, headers, content, status, error_type", CASES)
def test_malformed_request(srv, method, path, headers, content, status, error_type):
    if callable(content):
        content = content(LIMIT + 100000)
    response = httpx.request(method, srv.url + path, headers=headers, content=content, timeout=60)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    data = response.json()
    assert set(data) == {"error", "error_type"}
    assert data["error_type"] == error_type
    # /v1/* answers in OpenAI's shape, the message inside, and API.md's kind as its code
    message = data["error"]["message"] if path.startswith("/v1/") else data["error"]
    assert not path.startswith("/v1/") or data["error"]["code"] == error_type
    assert message.endswith(".") and len(message) > 20


def test_declared_oversize_body_is_refused_before_it_is_sent(srv):
    # Headers only: the server must answer without waiting for the 10 MB it was promised.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000\r\n\r\n{"
        )
        reply = b""
        while b'"}' not in reply and (chunk := sock.recv(65536)):
            reply += chunk
    reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413")
    assert '"error_type": "payload_too_large"' in reply


def test_request_metric_method_label_takes_no_client_string(srv):
    # Methods the HTTP parser lets through (WebDAV and cache ones) and made-up ones (refused or not,
    # depending on the parser): none may become a label of its own.
    made_up = ["PROPFIND", "PURGE", "MKCOL", "FROBNICATE", "X" * 64]
    for method in made_up:
        httpx.request(method, srv.url + "/classify", timeout=60)
    httpx.request("OPTIONS", srv.url + "/classify", timeout=60)
    samples = metrics(srv.url)
    methods = {dict(labels)["method"] for name, labels in samples if name == "loraplex_requests_total"}
    assert "other" in methods and "OPTIONS" in methods and "GET" in methods
    standard = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
    assert methods <= standard | {"other"}
    assert not methods & set(made_up)


def test_server_still_correct_and_never_500_after_bad_input(srv):
    ref = reference()
    response = httpx.post(srv.url + "/classify", json={"adapter_id": "sent", "inputs": TEXTS}, timeout=60)
    assert response.status_code == 200
    got = scores_of(response.json(), ref.labels["sent"])
    want = torch.softmax(ref.logits("sent", TEXTS).double(), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    samples = metrics(srv.url)
    statuses = {dict(labels)["status"] for name, labels in samples if name == "loraplex_requests_total"}
    assert "500" not in statuses
    assert "Traceback" not in srv.log()
    assert httpx.get(srv.url + "/health", timeout=60).status_code == 200
