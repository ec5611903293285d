"""A real loraplex server process on loopback, for tests that go through HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.paced_engine import EngineControl, time_factor

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`loraplex serve` in a subprocess; `with LiveServer(...) as srv:` waits for /ready.

    With `control`, or with LORAPLEX_TEST_ENGINE_SPEED set to a factor other than 1, the server runs
    `tests.paced_engine`'s engine: the real one, slowed or sped up by that factor and, through
    `control`, paced and held by the test (see tests/paced_engine.py).
    """

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        port: int | None = None,
        ready_timeout: float = 600.0,  # a bound for a slow or loaded machine, not an expected time
        control: EngineControl | None = None,
        module: str | None = None,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = list(args)
        self.control = control
        self.module = module  # run `python -m MODULE serve` (a test engine's entry point) instead
        controlled = control.env() if control else {}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **controlled, **(env or {})}
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    def start(self) -> LiveServer:
        import tempfile

        fd, path = tempfile.mkstemp(prefix="loraplex-server-", suffix=".log")
        self.log_path = Path(path)
        paced = self.control is not None or time_factor() != 1
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                self.module or ("tests.paced_engine" if paced else "loraplex"),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *self.args,
            ],
            cwd=REPO,
            env=self.env,
            stdout=fd,
            stderr=subprocess.STDOUT,
        )
        os.close(fd)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {self.ready_timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
