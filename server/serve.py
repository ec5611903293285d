"""`loraplex serve`: validate settings, then run the app under uvicorn with a graceful drain.

On SIGTERM (or Ctrl+C): /ready turns 503 and work routes refuse new requests at once; requests already
accepted finish; then the process exits 0. Whatever is still queued when `drain_grace_s` runs out gets
503. A second signal stops at once. Exit codes: 0 after a normal stop, 2 for a bad setting (including a
model or preload adapter that cannot be loaded), 1 for any other start-up failure.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from types import FrameType

import uvicorn

from loraplex.adapters.errors import LoraplexError
from loraplex.settings import SettingsError, build_parser, load_settings

log = logging.getLogger("loraplex.serve")


def main(argv: list[str] | None = None, *, engine_factory=None) -> int:
    """Run the server; `engine_factory` (called like `loraplex.engine.Engine`) replaces the engine class."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        build_parser().print_help()
        return 0
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        print(f"loraplex serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )

    from loraplex.app import create_app  # imports torch: only after the settings are known to be good

    app = (
        create_app(settings)
        if engine_factory is None
        else create_app(settings, engine_factory=engine_factory)
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = _Server(config, app.state)
    server.run()
    return server.exit_code


class _Server(uvicorn.Server):
    """uvicorn, with a drain before its own shutdown and an exit when start-up fails."""

    def __init__(self, config: uvicorn.Config, state):
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
        # Not calling super(): it would record the signal and re-raise it after shutdown, and the
        # process would end by the signal instead of exiting 0.
        if self._draining or self._loop is None or self.state.phase != "ready":
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
            await self.state.batcher.stop()
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        failure = self.state.failure
        if failure is not None and self.exit_code == 0:
            config_error = isinstance(failure, LoraplexError | ValueError | OSError)
            log.error("start-up failed: %s", failure, exc_info=None if config_error else failure)
            self.exit_code = 2 if config_error else 1
            return True
        return await super().on_tick(counter)
