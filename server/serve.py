"""`loraplex serve`: one engine process and N HTTP worker processes, watched by this supervisor.

    supervisor (this process: binds the port, starts and watches the others; no torch, no HTTP)
      ├─ engine process    the device, slots, batcher, adapter registry (loraplex.engine.process)
      └─ worker x N        uvicorn on the shared listening socket: parse, tokenize, post-process, answer
                           (loraplex.http.app), over ZeroMQ to the engine (loraplex.http.engine_client)

On SIGTERM (or Ctrl+C): every worker drains (/ready turns 503, work routes refuse new requests, requests
already accepted finish within `drain_grace_s`, the rest get 503), then the engine process stops, and the
supervisor exits 0. A second signal stops everything at once. A worker that dies is replaced (its clients'
connections close; its queued rows are dropped by the engine). An engine process that dies takes the server
down: every worker answers 503 at once, and the supervisor exits non-zero.

Exit codes: 0 after a normal stop, 2 for a bad setting (including a model or preload adapter that cannot be
loaded), 1 for any other failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections import deque
from types import FrameType

import uvicorn

from loraplex import logs
from loraplex.settings import Settings, SettingsError, build_parser, load_settings

log = logging.getLogger("loraplex.serve")

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # as loraplex.metrics reads it (imported only in children)
RESTARTS = (5, 60.0)  # more worker restarts than this within this many seconds: something is broken
POLL_S = 0.05
FORCE_WAIT_S = 10.0  # how long workers may take to go once the engine process is gone
PR_SET_PDEATHSIG = 1
ENGINE_STOP = signal.SIGUSR1  # what stops the engine process (it ignores SIGTERM: see engine_server)


def main(argv: list[str] | None = None, *, engine_factory=None) -> int:
    """Run the server; `engine_factory` (called like `loraplex.engine.core.Engine`) replaces the engine."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        build_parser().print_help()
        return 0
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        print(f"loraplex serve: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    return Supervisor(settings, engine_factory).run()


def exposure(settings: Settings) -> str:
    """What the start line says about who may use the server, when anyone on the network may."""
    if settings.loopback_only:
        return ""
    said = []
    if settings.anonymous_inference:
        said.append("INFERENCE AND ADAPTER READS ARE OPEN TO ANYONE (--allow-anonymous-inference)")
    if settings.metrics_token is None:
        labels = "with" if settings.metrics_adapter_limit else "without"
        said.append(f"/metrics is open, {labels} adapter ids")
    return "; " + "; ".join(said) if said else ""


def default_workers(settings: Settings) -> int:
    """HTTP workers when --workers is not given: on a GPU the front end is the bottleneck, so half the
    cores (the engine process and the tokenizers need the rest), at most 8; on the CPU the engine needs
    the cores, so one worker (two on a machine of more than 4 cores)."""
    cores = len(os.sched_getaffinity(0))
    if _uses_cuda(settings):
        return max(1, min(8, cores // 2))
    return 1 if cores <= 4 else 2


def _uses_cuda(settings: Settings) -> bool:
    if settings.device is not None:
        return settings.device.startswith("cuda")
    # "cuda when available", decided without importing torch here: an NVIDIA driver with a GPU.
    with contextlib.suppress(OSError):
        return any(os.scandir("/proc/driver/nvidia/gpus"))
    return False


class Supervisor:
    def __init__(self, settings: Settings, engine_factory=None):
        self.engine_factory = engine_factory
        self.workers = settings.workers or default_workers(settings)
        self.settings = settings.model_copy(update={"workers": self.workers})  # as the start line says
        self.stopping = False
        self.forced = False
        self.signals: deque[int] = deque()
        self.engine_pid = 0
        self.worker_pids: dict[int, int] = {}  # pid -> worker index
        self.restarts: deque[float] = deque()

    def run(self) -> int:
        s = self.settings
        self.run_dir = tempfile.mkdtemp(prefix="loraplex-")
        metrics_dir = os.path.join(self.run_dir, "metrics")
        os.mkdir(metrics_dir)
        os.environ[MULTIPROCESS_ENV] = metrics_dir  # before any child imports prometheus_client
        self.address = f"ipc://{self.run_dir}/engine"
        try:
            self.sock = _listen(s.host, s.port)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", s.host, s.port, exc)
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return 1
        try:
            return self._supervise()
        finally:
            self.sock.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _supervise(self) -> int:
        alive_r, alive_w = os.pipe()
        self.alive_r = alive_r
        self.engine_pid = self._fork(self._engine_main, alive_r)
        os.close(alive_w)  # the engine process holds the only write end: its exit closes the pipe
        for index in range(self.workers):
            self._start_worker(index, serve_while_loading=index == 0)
        log.info(
            "loraplex serving on http://%s:%d: 1 engine process (pid %d) and %d HTTP worker%s%s",
            self.settings.host, self.settings.port, self.engine_pid, self.workers, "s" * (self.workers != 1),
            exposure(self.settings),
        )  # fmt: skip
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        while True:
            while self.signals:
                self._handle_signal(self.signals.popleft())
            code = self._reap()
            if code is not None:
                return code
            time.sleep(POLL_S)

    # ---- children ----

    def _fork(self, target, *args) -> int:
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            _die_with_parent()
            code = target(*args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            logging.shutdown()
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _engine_main(self, alive_r: int) -> int:
        os.close(alive_r)
        self.sock.close()  # the engine takes no HTTP connections
        from loraplex.engine.process import run_engine

        if self.settings.engine_threads is not None:
            import torch

            torch.set_num_threads(self.settings.engine_threads)
        factory = self.engine_factory
        if factory is None:
            from loraplex.engine.core import Engine as factory
        return run_engine(self.settings, factory, self.address)

    def _start_worker(self, index: int, serve_while_loading: bool = False) -> None:
        """Fork worker `index`; only the first worker at start answers while the engine loads."""
        pid = self._fork(self._worker_main, index, serve_while_loading)
        self.worker_pids[pid] = index

    def _worker_main(self, index: int, serve_while_loading: bool) -> int:
        from loraplex.http.app import EngineLink, create_app

        s = self.settings
        link = EngineLink(self.address, self.alive_r, f"w{index}-{os.getpid()}", serve_while_loading)
        app = create_app(s, link)
        config = uvicorn.Config(
            app,
            log_level=s.log_level,
            log_config=None,  # uvicorn's records go through this process's own handler and format
            access_log=False,  # loraplex.access logs every request (loraplex.http.middleware)
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        server = WorkerServer(config, app.state)
        server.run(sockets=[self.sock])
        return server.exit_code

    def _reap(self) -> int | None:
        """Handle children that exited; returns the supervisor's exit code once it is time to go."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return 0 if self.stopping else 1
            if pid == 0:
                return None
            code = os.waitstatus_to_exitcode(status)
            if pid == self.engine_pid:
                self.engine_pid = 0
                return self._engine_exited(code)
            index = self.worker_pids.pop(pid, None)
            if index is None:
                continue
            _mark_dead(pid)
            if self.stopping:
                if not self.worker_pids and self.engine_pid:
                    _signal(self.engine_pid, ENGINE_STOP)  # every worker drained: the engine may go
                continue
            log.warning("HTTP worker %d (pid %d) exited with code %d; starting another", index, pid, code)
            now = time.monotonic()
            self.restarts.append(now)
            while self.restarts and self.restarts[0] < now - RESTARTS[1]:
                self.restarts.popleft()
            if len(self.restarts) > RESTARTS[0]:
                log.error("HTTP workers keep exiting (%d restarts in %.0f s); stopping", *RESTARTS)
                self.stopping = True
                self._stop_all(signal.SIGKILL)
                return self._wait_all(1)
            self._start_worker(index)

    def _engine_exited(self, code: int) -> int:
        if self.stopping and code in (0, -ENGINE_STOP):
            return self._wait_all(1 if self.forced else 0)
        if not self.stopping:
            log.error("the engine process exited with code %d; stopping the server", code)
        self.stopping = True
        for pid in self.worker_pids:
            _signal(pid, signal.SIGTERM)  # their requests fail with 503 at once: nothing waits
        return self._wait_all(code if code > 0 else 1, FORCE_WAIT_S)

    def _wait_all(self, code: int, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.worker_pids or self.engine_pid:
            if deadline is not None and time.monotonic() > deadline:
                self._stop_all(signal.SIGKILL)
                deadline = None
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(POLL_S)
                continue
            self.worker_pids.pop(pid, None)
            if pid == self.engine_pid:
                self.engine_pid = 0
        return code

    def _stop_all(self, sig: int) -> None:
        for pid in [*self.worker_pids, self.engine_pid]:
            if pid:
                _signal(pid, sig)

    # ---- signals ----

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.signals.append(sig)

    def _handle_signal(self, sig: int) -> None:
        if self.stopping:
            log.warning("%s again: stopping at once", signal.Signals(sig).name)
            self.forced = True
            self._stop_all(signal.SIGKILL)
            return
        self.stopping = True
        log.info(
            "%s: draining %d HTTP workers, then the engine", signal.Signals(sig).name, len(self.worker_pids)
        )
        for pid in self.worker_pids:
            _signal(pid, signal.SIGTERM)
        if not self.worker_pids and self.engine_pid:
            _signal(self.engine_pid, ENGINE_STOP)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _die_with_parent() -> None:
    """Linux: this child is killed if the supervisor dies without stopping it (no orphan holds the GPU)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _mark_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (requests in flight) from the shared metrics."""
    with contextlib.suppress(Exception):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


class WorkerServer(uvicorn.Server):
    """uvicorn in an HTTP worker: a drain before its own shutdown, and an exit when start-up fails."""

    def __init__(self, config, state):
        super().__init__(config)
        self.state = state
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Ctrl+C reaches every process of the group: the supervisor turns it into one SIGTERM per worker.
        if sig == signal.SIGINT:
            return
        # Not calling super(): it would record the signal and re-raise it after shutdown, and the
        # process would end by the signal instead of exiting 0. A signal to the whole group reaches a
        # worker twice (directly, and forwarded by the supervisor): once draining, it is ignored; the
        # supervisor kills the workers on a second signal of its own.
        if self._draining:
            return
        if not self.started and self.state.phase == "loading":
            os._exit(0)  # still waiting for the engine, with no connection taken: nothing to drain
        if self._loop is None or self.state.phase != "ready":
            self.force_exit = self.should_exit
            self.should_exit = True
            return
        self._draining = True
        self.state.phase = "draining"
        self._loop.call_soon_threadsafe(self._begin_drain, signal.Signals(sig).name)

    def _begin_drain(self, signal_name: str) -> None:
        log.info("%s: draining %d requests in flight", signal_name, self.state.inflight)
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.state.settings.drain_grace_s
        while self.state.inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.state.inflight:
            log.warning("grace period over; %d requests still in flight get 503", self.state.inflight)
            from loraplex.adapters.errors import UnavailableError

            self.state.client.fail_all(
                UnavailableError("The server is shutting down; retry on another replica.", 1), "shutdown"
            )
            while self.state.inflight:
                await asyncio.sleep(0.01)
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        failure = self.state.failure
        if failure is not None and self.exit_code == 0:
            log.error("start-up failed: %s", failure)
            self.exit_code = 1
            return True
        return await super().on_tick(counter)
