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
import itertools
import logging

import zmq

from loraplex import ipc
from loraplex.adapters.errors import UnavailableError

log = logging.getLogger("loraplex.http.engine_client")


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
        self._context: zmq.Context | None = None
        self._socket: zmq.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._check_scheduled = False
        self._outbox: list[list] = []

    async def start(self) -> None:
        """Connect; answers are read on this event loop (a reader on the socket's file descriptor, no
        thread: sends are non-blocking, and the queues have no high-water mark, so none is dropped)."""
        self._loop = asyncio.get_running_loop()
        self._context = zmq.Context()
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.IDENTITY, self.identity.encode())
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.connect(self.address)  # queued until the engine binds: `hello` waits for a warm engine
        self._socket = socket
        self._fd = socket.getsockopt(zmq.FD)
        self._loop.add_reader(self._fd, self._read)

    async def close(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None
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
        self._send([op, request_id, *args])
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
        self._send(["cancel", request_id, reason])

    def fail_all(self, exc: Exception, reason: str | None = None) -> None:
        """Fail every waiting request with `exc`; with a `reason`, the engine drops their rows too."""
        waiting, self._waiting = self._waiting, {}
        for request_id, future in waiting.items():
            if not future.done():
                future.set_exception(exc)
            if reason is not None and self._gone is None:
                self._send(["cancel", request_id, reason])

    def engine_gone(self) -> None:
        """The engine process ended: fail what waits, and every later request, with 503."""
        if self._gone is None:
            self._gone = engine_gone_error()
            self.fail_all(self._gone)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _send(self, message: list) -> None:
        """Queue a message; what one turn of the event loop queues leaves as one frame."""
        self._outbox.append(message)
        if len(self._outbox) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        if self._socket is None or not outbox:
            return
        self._socket.send(ipc.encode(outbox), zmq.NOBLOCK, copy=False)
        # The socket's descriptor signals only edges, and a send can consume one: look again soon.
        if not self._check_scheduled:
            self._check_scheduled = True
            self._loop.call_soon(self._read)

    def _read(self) -> None:
        """Hand every answer that has arrived to its future."""
        self._check_scheduled = False
        socket = self._socket
        if socket is None:
            return
        while socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frame = socket.recv(zmq.NOBLOCK, copy=False)
            try:
                answers = ipc.decode(frame.buffer)
            except Exception:
                log.warning("dropped a message from the engine that is not an answer")
                continue
            for request_id, ok, payload in answers:
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
