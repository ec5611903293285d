"""The engine process: it owns the device, the slots, the batcher and the adapter registry.

HTTP workers send it tokenized rows and adapter operations over ZeroMQ (`loraplex.ipc`); rows of every
worker are queued in one batcher, so batches mix them, and the queue bound counts them all. The model runs
on its own `EngineThread`; this process's event loop only moves messages, resolves adapters and packs
results, so the thread that runs the model never waits on HTTP work.

    code = run_engine(settings, engine_factory, "ipc:///run/loraplex/engine")   # in its own process

It stops on SIGUSR1, which the supervisor sends once every worker has drained; SIGTERM and SIGINT are
ignored here, so that a signal sent to the whole process group (Ctrl+C, `timeout`, a service manager) lets
the workers drain against a running engine. Exit codes: 0 after a stop, 2 when the model or a preloaded
adapter cannot be loaded (a bad setting), 1 for any other start-up failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from loraplex import ipc
from loraplex.adapters.errors import InvalidAdapterError, LoraplexError
from loraplex.adapters.peft import FEATURE_EXTRACTION, AdapterWeights
from loraplex.adapters.registry import Registry
from loraplex.adapters.stores import open_store
from loraplex.adapters.tasks import check_route, routes_of
from loraplex.console import version
from loraplex.engine.batcher import Batcher, EngineThread
from loraplex.ipc import Tokens
from loraplex.metrics import Metrics
from loraplex.settings import Settings

log = logging.getLogger("loraplex.engine_process")

STOP_SIGNAL = signal.SIGUSR1  # from the supervisor: stop (while loading, its default action ends us)
WORKER_CHECK_S = 0.5  # how often requests of workers that died are looked for
DESCRIBED_KEPT = 4096  # adapter versions whose description the engine keeps (then it starts again)

# The base model itself, for /embed without an adapter: an adapter without LoRA or head in a slot of its own.
BASE_WEIGHTS = AdapterWeights(
    modules={},
    head={},
    num_labels=0,
    labels=(),
    rank=0,
    lora_alpha=0.0,
    target_modules=(),
    task=FEATURE_EXTRACTION,
)


@dataclass(frozen=True)
class BaseHandle:
    """The served base model as a handle; its key is no adapter's (adapter ids are never empty)."""

    adapter_id: None = None
    version: str = "base"
    labels: tuple[str, ...] = ()
    weights: AdapterWeights = BASE_WEIGHTS
    task: str = FEATURE_EXTRACTION
    problem_type: None = None

    @property
    def key(self) -> tuple[str, str]:
        return ("", self.version)


def start_line(s: Settings, engine, adapters: str) -> str:
    """The one line that says what this server is: version, model, device and dtype, the settings that
    decide its capacity and its exposure, and what the store holds."""
    base = engine.base
    auth = "api key" if s.api_key else "open"
    writes = "admin token" if s.admin_token else "loopback only" if s.loopback_only else "open to all"
    if s.admin_token is None and not s.loopback_only and not s.allow_unauthenticated_writes:
        writes = "off (no admin token)"
    return (
        f"loraplex {version()} ready on http://{s.host}:{s.port}: model {base.model_name} "
        f"({base.model_type}, "
        f"hidden {base.hidden_size}, {base.num_layers} layers, max {base.max_length} tokens) on "
        f"{engine.device} in {engine.dtype} ({getattr(engine, 'matmul', 'plain')} matmuls); {s.workers} HTTP "
        f"worker(s); "
        f"{engine.num_slots} slots, host cache {s.max_host_cache}, rank <= {s.max_rank}, labels <= "
        f"{s.max_labels}; batches <= {s.max_batch_size} rows / {s.max_batch_tokens} tokens, wait "
        f"{s.max_wait_ms:g} ms, queue {s.max_queued}; timeout {s.request_timeout_s:g} s; store "
        f"{s.adapter_store} ({adapters}, staleness {s.staleness_s:g} s); requests {auth}, "
        f"adapter writes {writes}"
    )


def run_engine(settings: Settings, engine_factory: Callable, address: str) -> int:
    """Build the engine, then serve the workers at `address` until told to stop; returns the exit code."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # the supervisor stops us in turn, after the workers
        signal.signal(sig, signal.SIG_IGN)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_EngineProcess(settings, engine_factory, address).run())


def _loop_factory() -> Callable | None:
    """uvloop's event loop where it is installed (with uvicorn's standard extras, as the workers run):
    a wake-up from the engine thread (with its callbacks and timers) costs about a quarter less CPU."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


class _EngineProcess:
    def __init__(self, settings: Settings, engine_factory: Callable, address: str):
        self.settings = settings
        self.engine_factory = engine_factory
        self.address = address
        self.metrics = Metrics(settings.metrics_adapter_limit)
        self.pending: dict[tuple[bytes, int], asyncio.Task] = {}  # (worker, request id) -> its task
        self.jobs: dict[tuple[bytes, int], object] = {}  # ... -> its queued Job, once submitted
        self.described: dict[tuple[str, str], dict] = {}  # adapter version -> `_describe`'s answer
        self.stopping = asyncio.Event()
        self.handlers = {
            "hello": self._hello,
            "infer": self._infer,
            "check": self._check,
            "put": self._put,
            "delete": self._delete,
            "info": self._info,
            "list": self._list,
            "stats": self._stats,
        }

    async def run(self) -> int:
        try:
            thread, engine, registry = await self._build()
        except Exception as exc:
            config_error = isinstance(exc, LoraplexError | ValueError | OSError)
            log.error("start-up failed: %s", exc, exc_info=None if config_error else exc)
            return 2 if config_error else 1
        s = self.settings
        self.engine, self.registry = engine, registry
        self.metrics.watch_registry(registry)
        self.batcher = Batcher(
            engine,
            registry,
            self.metrics,
            max_batch_tokens=s.max_batch_tokens,
            max_batch_size=s.max_batch_size,
            max_wait_s=s.max_wait_ms / 1000,
            max_queued=s.max_queued,
            thread=thread,
        )
        self.batcher.start()
        registry.start()
        asyncio.get_running_loop().add_signal_handler(STOP_SIGNAL, self.stopping.set)
        self.info = {
            "model_name": engine.base.model_name,
            "model_dir": s.model or _default_model_dir(),
            "max_length": engine.base.max_length,
            "hidden_size": engine.base.hidden_size,
            "model_type": engine.base.model_type,
            "device": str(engine.device),
            "dtype": engine.dtype,
            "num_slots": engine.num_slots,
        }
        context = zmq.Context()
        self.socket = context.socket(zmq.ROUTER)
        for option, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
            self.socket.setsockopt(option, value)
        self.socket.bind(self.address)
        self.loop = asyncio.get_running_loop()
        self.check_scheduled = False
        self.outbox: dict[bytes, list] = {}
        fd = self.socket.getsockopt(zmq.FD)
        self.loop.add_reader(fd, self._receive)
        try:
            adapters = f"{len(await registry.list())} adapters"
        except LoraplexError:
            adapters = "not listed: the store did not answer"
        log.info(start_line(s, engine, adapters))
        gc.collect()  # start-up's garbage first: a frozen object is never collected
        gc.freeze()  # the model and what start-up made live as long as the process: collections skip them
        watching = asyncio.ensure_future(self._watch_workers())
        await self.stopping.wait()
        self.loop.remove_reader(fd)
        watching.cancel()
        dropped = await self.batcher.stop()
        log.info("engine stopped; the drain dropped %d queued inputs", dropped)
        await registry.close()
        self.socket.close(0)
        context.term()
        return 0

    async def _build(self):
        s = self.settings
        thread = EngineThread()  # the engine is built, warmed up and run on this one thread
        try:
            engine = await thread.run(
                self.engine_factory,
                s.model,
                device=s.device,
                dtype=s.dtype,
                num_slots=s.max_resident,
                max_rank=s.max_rank,
                max_labels=s.max_labels,
            )
            # What the store holds is read no larger than an upload may be: a foreign object is refused.
            store = await asyncio.to_thread(open_store, s.adapter_store, s.max_upload_bytes)
            registry = Registry(
                store,
                engine,
                max_host_cache=s.max_host_cache,
                staleness_s=s.staleness_s,
                max_rank=s.max_rank,
                max_labels=s.max_labels,
                max_model_bytes=s.max_upload_bytes,
            )
            for adapter_id, folder in s.preload_items():
                try:
                    record, _ = await registry.import_dir(adapter_id, folder)  # warnings are logged
                except LoraplexError as exc:
                    raise InvalidAdapterError(f"--preload {adapter_id}={folder}: {exc.message}") from exc
                log.info("preloaded adapter %s version %s from %s", adapter_id, record.version, folder)
            await thread.run(engine.warmup)
        except BaseException:
            thread.close()
            raise
        return thread, engine, registry

    # ---- messages ----

    def _receive(self) -> None:
        """Take every request that has arrived (a reader on the socket's descriptor, which signals edges)."""
        self.check_scheduled = False
        socket = self.socket
        while socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            worker, frame = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            worker = worker.bytes
            try:
                messages = ipc.decode(frame.buffer)
            except Exception:
                log.warning("dropped a frame that is not a list of requests")
                continue
            for message in messages:
                try:
                    op, request_id, *args = message
                except (TypeError, ValueError):
                    log.warning("dropped a message that is not a request")
                    continue
                if op == "cancel":
                    self._cancel(worker, request_id, *args)
                    continue
                if op == "infer" and self._infer_now((worker, request_id), *args):
                    continue
                handler = self.handlers.get(op)
                if handler is None:
                    log.warning("dropped a request of unknown kind %r", op)
                    continue
                key = (worker, request_id)
                self.pending[key] = asyncio.ensure_future(self._answer(key, handler, args))

    def _send(self, worker: bytes, answer: list) -> None:
        """Queue an answer; what one turn of the event loop answers a worker leaves as one frame."""
        if not self.outbox:
            self.loop.call_soon(self._flush)
        self.outbox.setdefault(worker, []).append(answer)

    def _flush(self) -> None:
        outbox, self.outbox = self.outbox, {}
        for worker, answers in outbox.items():
            # A worker that is gone is no peer any more: ROUTER drops what is sent to it.
            self.socket.send_multipart([worker, ipc.encode(answers)], zmq.NOBLOCK, copy=False)
        if not self.check_scheduled:  # a send can consume the descriptor's edge: look again soon
            self.check_scheduled = True
            self.loop.call_soon(self._receive)

    async def _answer(self, key: tuple[bytes, int], handler, args: list) -> None:
        try:
            payload, ok = await handler(key, *args), True
        except asyncio.CancelledError:
            return  # the worker gave up on it (timeout, client gone, worker gone): nobody to answer
        except LoraplexError as exc:
            payload, ok = ipc.error_payload(exc), False
        except Exception as exc:  # never leave a worker waiting: an unexpected fault is the server's
            log.error("request %s failed", handler.__name__, exc_info=exc)
            payload, ok = ipc.SERVER_FAULT, False
        finally:
            self.pending.pop(key, None)
            self.jobs.pop(key, None)
        worker, request_id = key
        self._send(worker, [request_id, ok, payload])

    async def _hello(self, key) -> dict:
        return self.info

    def _infer_now(self, key, adapter_id: str | None, route: str, top_k: int | None, rows: list) -> bool:
        """The common case without a task: the adapter's current version is in host memory, so the rows
        are queued at once and the answer leaves from the job's callback. False: take the slow path."""
        try:
            handle = BaseHandle() if adapter_id is None else self.registry.get_cached(adapter_id)
            if handle is None:
                return False
            check_route(handle, route, top_k)
            job = self.batcher.submit([Tokens(ids, start) for ids, start in rows], handle)
        except LoraplexError as exc:
            self._send(key[0], [key[1], False, ipc.error_payload(exc)])
            return True
        self.jobs[key] = job
        job.future.add_done_callback(lambda future: self._job_done(key, handle, job))
        return True

    def _job_done(self, key, handle, job) -> None:
        if self.jobs.pop(key, None) is None or job.future.cancelled():
            return  # given up on by its worker: nobody to answer
        exc = job.future.exception()
        if exc is None:
            answer = [key[1], True, self._result(handle, job)]
        elif isinstance(exc, LoraplexError):
            answer = [key[1], False, ipc.error_payload(exc)]
        else:
            log.error("request failed", exc_info=exc)
            answer = [key[1], False, ipc.SERVER_FAULT]
        self._send(key[0], answer)

    async def _infer(self, key, adapter_id: str | None, route: str, top_k: int | None, rows: list) -> dict:
        handle = BaseHandle() if adapter_id is None else await self.registry.get(adapter_id)
        check_route(handle, route, top_k)
        job = self.batcher.submit([Tokens(ids, start) for ids, start in rows], handle)
        self.jobs[key] = job
        try:
            await job.future
        except asyncio.CancelledError:
            if not job.future.done():
                self.batcher.cancel(job, "disconnect")
            raise
        return self._result(handle, job)

    def _result(self, handle, job) -> dict:
        return {
            "adapter": self._describe(handle),
            "queue_s": job.queue_seconds,
            "inference_s": job.inference_seconds,
            "outputs": [ipc.pack_array(row.numpy()) for row in job.logits],
        }

    def _describe(self, handle) -> dict:
        """What a worker is told of the adapter version that ran, made once per version (its labels and
        task never change; its metric label is fixed once given)."""
        described = self.described.get(handle.key)
        if described is None:
            if len(self.described) >= DESCRIBED_KEPT:
                self.described.clear()
            described = self.described[handle.key] = {
                "adapter_id": handle.adapter_id,
                "version": handle.version,
                "labels": list(handle.labels),
                "task": handle.task,
                "problem_type": handle.problem_type,
                "metric_label": self.metrics.adapter_label(handle.adapter_id or "(base model)"),
            }
        return described

    async def _check(self, key, adapter_id: str | None, route: str) -> None:
        handle = BaseHandle() if adapter_id is None else await self.registry.get(adapter_id)
        check_route(handle, route)

    def _cancel(self, worker: bytes, request_id: int, reason: str = "disconnect") -> None:
        key = (worker, request_id)
        job = self.jobs.pop(key, None)
        if job is not None and not job.future.done():
            self.batcher.cancel(
                job, reason if reason in ("disconnect", "timeout", "shutdown") else "disconnect"
            )
        task = self.pending.pop(key, None)
        if task is not None:
            task.cancel()

    async def _put(self, key, adapter_id, config, model, labels, filename) -> dict:
        record, created, warnings = await self.registry.put_noting(
            adapter_id, config, model, labels, model_filename=filename
        )
        return {"record": {**self._record(record), "warnings": warnings}, "created": created}

    async def _delete(self, key, adapter_id: str) -> None:
        await self.registry.delete(adapter_id)

    async def _info(self, key, adapter_id: str) -> dict:
        return self._record(await self.registry.info(adapter_id))

    async def _list(self, key) -> list[dict]:
        return [self._record(record) for record in await self.registry.list()]

    async def _stats(self, key) -> dict:
        r = self.registry
        return {
            "queue_depth": self.batcher.depth,
            "resident": r.resident,
            "host_cached": r.host_cached,
            "hits": r.hits,
            "misses": r.misses,
            "evictions": r.evictions,
            "store_loads": r.store_loads,
            "damaged": r.damaged,
            "host_evictions": r.host_evictions,
        }

    def _record(self, record) -> dict:
        return {
            **record.to_json(),
            "routes": routes_of(record.task_type, record.num_labels),
            "resident": self.registry.is_resident(record.adapter_id, record.version),
        }

    async def _watch_workers(self) -> None:
        """Drop the queued rows of workers that died: nobody will read their answers."""
        while True:
            await asyncio.sleep(WORKER_CHECK_S)
            for worker in {worker for worker, _ in [*self.pending, *self.jobs]}:
                if not _alive(worker):
                    for key in {key for key in [*self.pending, *self.jobs] if key[0] == worker}:
                        self._cancel(*key, "disconnect")


def _alive(worker: bytes) -> bool:
    """Whether the worker process named by this identity (`w<index>-<pid>`) still runs."""
    with contextlib.suppress(ValueError):
        pid = int(worker.decode().rsplit("-", 1)[1])
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"  # a zombie has exited
        except FileNotFoundError:
            return False
        except OSError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 0)
                return True
            return False
    return True


def _default_model_dir() -> str:
    from loraplex.engine.core import default_model_dir

    return default_model_dir()
