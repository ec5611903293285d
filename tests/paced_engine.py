"""A real engine whose time the tests control, and the `loraplex serve` that runs it.

`PacedEngine` is `loraplex.engine.core.Engine` with every batch computed by the real engine, then:

1. stretched by `LORAPLEX_TEST_ENGINE_SPEED`, a factor on the engine's time per batch (default 1):
   0.2 runs the engine five times faster, 5 five times slower. With a factor above 1 a batch sleeps for
   (factor - 1) x its compute time; with any factor a paced batch (`EngineControl.pace`) lasts
   `pace x factor`. This is how the suite shows that it holds on a machine 5x faster or 5x slower.
2. held at a gate that the test opens: `EngineControl.hold()` lets no further batch finish,
   `step(n)` lets n more finish, `release()` opens the gate. While held, the engine keeps its batch,
   so what is queued stays queued for as long as the test needs, whatever the machine's speed.

The test and the server process share a folder: the test writes `pace` and `allow`, the engine writes
`entered` and `done` ("batches rows", counted since start, warm-up excluded).

    control = EngineControl()
    with LiveServer(..., control=control) as srv:   # runs `python -m tests.paced_engine serve ...`
        control.hold()
        ...                                         # whatever reaches the engine stays there
        control.release()
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

SPEED_ENV = "LORAPLEX_TEST_ENGINE_SPEED"
CONTROL_ENV = "LORAPLEX_TEST_ENGINE_CONTROL"
POLL_S = 0.005


def time_factor() -> float:
    """`LORAPLEX_TEST_ENGINE_SPEED`: the factor on the engine's time per batch (1 when unset)."""
    raw = os.environ.get(SPEED_ENV, "").strip()
    factor = float(raw) if raw else 1.0
    if not factor > 0:
        raise ValueError(f"{SPEED_ENV} must be a positive number, got {raw!r}")
    return factor


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers see the old or the new text, never half of it


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _counts(path: Path) -> tuple[int, int]:
    text = _read(path)
    if not text:
        return 0, 0
    batches, rows = text.split()
    return int(batches), int(rows)


class EngineControl:
    """The test's side: pace and gate the engine of a server started with `LiveServer(control=...)`."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder or tempfile.mkdtemp(prefix="loraplex-engine-control-"))

    def env(self) -> dict[str, str]:
        return {CONTROL_ENV: str(self.folder)}

    def pace(self, seconds: float) -> None:
        """Make every batch last at least `seconds` x the time factor (0: its compute time)."""
        _write(self.folder / "pace", repr(float(seconds)))

    def hold(self) -> None:
        """Let no further batch finish: the next batch to reach the engine stays there. Call while idle."""
        _write(self.folder / "allow", str(self.done()[0]))

    def step(self, batches: int = 1) -> None:
        """While held: let `batches` more batches finish."""
        allowed = _read(self.folder / "allow")
        base = int(allowed) if allowed else self.done()[0]
        _write(self.folder / "allow", str(base + batches))

    def release(self) -> None:
        """Open the gate and stop pacing: batches take their (time-factored) compute time again."""
        for name in ("allow", "pace"):
            (self.folder / name).unlink(missing_ok=True)

    def entered(self) -> tuple[int, int]:
        """(batches, rows) that reached the engine, the held batch included."""
        return _counts(self.folder / "entered")

    def done(self) -> tuple[int, int]:
        """(batches, rows) that the engine finished and handed back to the batcher."""
        return _counts(self.folder / "done")


def _engine_class():
    from loraplex.engine.core import Engine

    class PacedEngine(Engine):
        """The real engine, stretched by the time factor and paced and gated through the control folder."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.factor = time_factor()
            folder = os.environ.get(CONTROL_ENV)
            self.control = Path(folder) if folder else None
            self.entered = [0, 0]
            self.done = [0, 0]
            self.warming = False

        def warmup(self) -> None:
            self.warming = True
            try:
                super().warmup()
            finally:
                self.warming = False

        def classify(self, token_ids, slots):
            if self.warming:
                return super().classify(token_ids, slots)
            started = time.monotonic()
            self._count(self.entered, "entered", len(token_ids))
            logits = super().classify(token_ids, slots)
            compute = time.monotonic() - started
            until = started + max(compute * self.factor, self._pace() * self.factor)
            while (left := until - time.monotonic()) > 0:
                time.sleep(left)
            while self._held():
                time.sleep(POLL_S)
            self._count(self.done, "done", len(token_ids))
            return logits

        def _pace(self) -> float:
            text = _read(self.control / "pace") if self.control else None
            return float(text) if text else 0.0

        def _held(self) -> bool:
            text = _read(self.control / "allow") if self.control else None
            return bool(text) and self.done[0] >= int(text)

        def _count(self, counts: list[int], name: str, rows: int) -> None:
            counts[0] += 1
            counts[1] += rows
            if self.control:
                _write(self.control / name, f"{counts[0]} {counts[1]}")

    return PacedEngine


def main(argv: list[str]) -> int:
    """`python -m tests.paced_engine serve ARGS`: `loraplex serve ARGS` with the paced engine."""
    if argv[:1] != ["serve"]:
        print("usage: python -m tests.paced_engine serve [ARGS]", file=sys.stderr)
        return 2
    from loraplex.serve import main as serve

    return serve(argv[1:], engine_factory=_engine_class())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
