"""An HTTP worker's link to the engine process: requests out over a ZeroMQ DEALER socket, answers matched
back to their futures by request id.

    client = EngineClient("ipc:///run/loraplex/engine", "w0-4242")
    await client.start()
    info = await client.call("hello")                  # answered once the engine is warm
    request_id, answer = client.send("infer", ...)     # a future; client.cancel(request_id) drops its rows
    client.engine_gone()                               # every waiting request fails with 503 at once

The identity names the worker's pid, so that the engine process can drop the rows of a worker that died.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging

import zmq
import zmq.asyncio

from loraplex import ipc
from loraplex.adapters.errors import UnavailableError

log = logging.getLogger("loraplex.engine_client")


def engine_gone_error() -> UnavailableError:
    return UnavailableError(
        "The engine process of this server stopped; retry after the time in Retry-After or on another "
        "replica.",
        1,
    )


class EngineClient:
    def __init__(self, address: str, identity: str):
        self.address = address
        self.identity = identity
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._gone: UnavailableError | None = None
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        self._context = zmq.asyncio.Context()
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.IDENTITY, self.identity.encode())
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.address)  # queued until the engine binds: `hello` waits for a warm engine
        self._socket = socket
        self._reader = asyncio.ensure_future(self._read())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._socket is not None:
            self._socket.close(0)
        if self._context is not None:
            self._context.term()

    def send(self, op: str, *args) -> tuple[int, asyncio.Future]:
        """Send a request; returns its id and the future of its answer (a LoraplexError on failure)."""
        future = asyncio.get_running_loop().create_future()
        if self._gone is not None:
            future.set_exception(self._gone)
            return 0, future
        request_id = next(self._ids)
        self._waiting[request_id] = future
        self._socket.send(ipc.encode([op, request_id, *args]), copy=False)
        return request_id, future

    async def call(self, op: str, *args):
        """Send a request and wait for its answer."""
        request_id, future = self.send(op, *args)
        try:
            return await future
        finally:
            if not future.done():
                self.cancel(request_id, "disconnect")

    def cancel(self, request_id: int, reason: str) -> None:
        """Give up on a request: the engine drops its queued rows and sends no answer."""
        future = self._waiting.pop(request_id, None)
        if future is None or self._gone is not None:
            return
        future.cancel()
        self._socket.send(ipc.encode(["cancel", request_id, reason]), copy=False)

    def fail_all(self, exc: Exception, reason: str | None = None) -> None:
        """Fail every waiting request with `exc`; with a `reason`, the engine drops their rows too."""
        waiting, self._waiting = self._waiting, {}
        for request_id, future in waiting.items():
            if not future.done():
                future.set_exception(exc)
            if reason is not None and self._gone is None:
                self._socket.send(ipc.encode(["cancel", request_id, reason]), copy=False)

    def engine_gone(self) -> None:
        """The engine process ended: fail what waits, and every later request, with 503."""
        if self._gone is None:
            self._gone = engine_gone_error()
            self.fail_all(self._gone)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def _read(self) -> None:
        socket = self._socket
        while True:
            frame = await socket.recv(copy=False)
            try:
                request_id, ok, payload = ipc.decode(frame.buffer)
            except Exception:
                log.warning("dropped a message from the engine that is not an answer")
                continue
            future = self._waiting.pop(request_id, None)
            if future is None or future.done():
                continue  # given up on (cancelled, timed out) before the answer came
            if ok:
                future.set_result(payload)
            else:
                try:
                    ipc.raise_error(payload)
                except Exception as exc:
                    future.set_exception(exc)
