"""Per-request plumbing around every route: admission, body limit, in-flight count, request metrics, the
access log, and OpenAI's error shape on /v1/*.

- Admission: while the model loads or the server drains, work routes answer 503 at once (a worker whose
  engine process is already warm waits for its own start instead).
- Body limit: a declared Content-Length over the limit gets 413 before any of the body is read; a body
  without one (chunked) is counted as it arrives and cut off at the limit.
- In-flight count: the drain on SIGTERM waits for it to reach zero.
- Access log: one line per request on logger `loraplex.access` (INFO; the operations routes at DEBUG):
  method, route, adapter, status, rows, ms. The routes fill in adapter and rows (`ACCESS_KEY`).
- /v1/* errors: `{"error": {"message", "type", "param", "code"}, "error_type"}`, the shape OpenAI's SDKs
  read, with the kind of API.md's errors kept in `error_type` and `code`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.adapters.errors import PayloadTooLargeError, UnavailableError
from loraplex.http.errors import response_for
from loraplex.http.schemas import openai_error
from loraplex.metrics import method_label

# Routes that never queue work: open during loading and draining, not counted as in flight.
OPS_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/redoc", "/openapi.json"})
OPS_PREFIX = "/docs/"  # the docs' assets and OAuth redirect page
# The route label of a request refused while the server is not ready (loading, draining, failed).
NOT_READY = "not_ready"
ACCESS_KEY = "loraplex.access"  # scope key: {"adapter": ..., "rows": ...} as the route learns them
OPENAI_PREFIX = "/v1/"
access_log = logging.getLogger("loraplex.access")

_REFUSED = {
    "loading": "The model is still loading; retry when /ready answers 200.",
    "draining": "The server is shutting down; retry on another replica.",
    "failed": "The server failed to start; see its log.",
}


class ServingMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        started = time.perf_counter()
        status = 500  # what an exception that escapes every handler becomes
        replica = state.settings.replica_id.encode()
        worker = state.worker_header
        access = scope[ACCESS_KEY] = {"adapter": None, "rows": 0}
        path = scope["path"]
        if path.startswith(OPENAI_PREFIX):
            send = _openai_errors(send)

        label = None  # the matched route's template once routed; NOT_READY for a refusal while not ready
        counted = False

        def count() -> None:
            # Before the answer goes out, so that a client that has its answer finds it counted.
            nonlocal label, counted
            if label is None:
                label = _route_label(scope)
            metrics = state.metrics
            metrics.child(metrics.requests, label, method_label(scope["method"]), str(status)).inc()
            counted = True

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # Which replica and which of its HTTP workers answered, for operators behind a load balancer.
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-loraplex-replica", replica),
                    (b"x-loraplex-worker", worker),
                ]
                if not counted:
                    count()
            await send(message)

        tracked = path not in OPS_PATHS and not path.startswith(OPS_PREFIX)
        try:
            if not tracked:
                await self.app(scope, receive, send_status)
                return
            if state.phase == "loading":
                await _settle(state)
            refusal = self._refusal(state, scope)
            if refusal is not None:
                if state.phase != "ready":
                    label = NOT_READY
                await response_for(refusal)(scope, receive, send_status)
                return
            state.inflight += 1
            state.metrics.in_flight.inc()
            try:
                await self.app(scope, _limited(receive, state.settings.body_limit(path)), send_status)
            finally:
                state.inflight -= 1
                state.metrics.in_flight.dec()
        finally:
            if not counted:  # no answer was sent (an exception that escaped every handler)
                count()
            seconds = time.perf_counter() - started
            state.metrics.child(state.metrics.request_seconds, label).observe(seconds)
            _log_access(scope, label, access, status, seconds, tracked)

    @staticmethod
    def _refusal(state, scope: Scope) -> Exception | None:
        if state.phase != "ready":
            return UnavailableError(_REFUSED[state.phase], retry_after=1)
        limit = state.settings.body_limit(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return _too_large(limit)
        return None


async def _settle(state) -> None:
    """Worker 0 takes connections while the server loads, and its own start (the engine's answer to its
    hello, its tokenizer) may end a moment after another worker's, whose /ready already says 200. Once
    the engine process is warm (it binds its socket only then), a work request waits for this worker's
    start instead of getting "loading"; before that, it is refused at once."""
    starting = getattr(state, "starting", None)
    address = state.link.address if state.link is not None else ""
    if starting is None or not address.startswith("ipc://") or not os.path.exists(address[6:]):
        return
    await asyncio.wait((starting,), timeout=state.settings.request_timeout_s)


def _route_label(scope: Scope) -> str:
    """The template of the route that answered: FastAPI's routes put themselves in the scope; a plain
    Starlette route (the OpenAPI document) is found by matching; "unmatched" when none matches."""
    route = scope.get("route")
    if route is None and "app" in scope:
        route = next((r for r in scope["app"].router.routes if r.matches(scope)[0] is Match.FULL), None)
    return getattr(route, "path", None) or "unmatched"


def _limited(receive: Receive, limit: int) -> Receive:
    received = 0

    async def receive_within_limit() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _too_large(limit)
        return message

    return receive_within_limit


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The request body is larger than the limit of {limit} bytes.")


def _log_access(scope: Scope, label: str, access: dict, status: int, seconds: float, tracked: bool) -> None:
    level = logging.INFO if tracked else logging.DEBUG  # probes and scrapes would drown the rest
    if not access_log.isEnabledFor(level):
        return
    route = label if label not in ("unmatched", NOT_READY) else _printable(scope["path"])
    method, adapter, rows, ms = _printable(scope["method"]), access["adapter"], access["rows"], seconds * 1000
    access_log.log(
        level,
        "%s %s adapter=%s status=%d rows=%d ms=%.1f",
        method, route, adapter or "-", status, rows, ms,
        extra={"method": method, "route": route, "adapter": adapter, "status": status, "rows": rows,
               "ms": round(ms, 1)},
    )  # fmt: skip


def _printable(text: str, limit: int = 200) -> str:
    """A client's text as one log line may hold it: printable, bounded."""
    text = text[:limit]
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def _openai_errors(send: Send) -> Send:
    """`send`, with every JSON error body rewritten into OpenAI's shape (buffered: error bodies are small)."""
    held: list[Message] = []

    async def send_openai(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            held.append(message)
            return
        if not held or message["type"] != "http.response.body":
            await send(message)
            return
        held.append(message)
        if message.get("more_body", False):
            return
        start, *parts = held
        held.clear()
        body = _openai_body(b"".join(part.get("body", b"") for part in parts), start["status"])
        headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return send_openai


def _openai_body(raw: bytes, status: int) -> bytes:
    try:
        flat = json.loads(raw)
    except ValueError:
        flat = None
    if not isinstance(flat, dict) or not isinstance(flat.get("error"), str):
        return raw  # not one of ours
    body = openai_error(flat["error"], str(flat.get("error_type", "internal")))
    return json.dumps(body, ensure_ascii=True).encode()
