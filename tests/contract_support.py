"""One live server for the contract and documentation tests: the demo adapter, a non-default client batch."""

from __future__ import annotations

import atexit
import tempfile
from functools import lru_cache
from pathlib import Path

from tests.live_server import LiveServer

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "adapters" / "demo" / "tweet-sentiment"
MAX_CLIENT_BATCH = 9  # not the default, so a document that ignores the setting shows


@lru_cache(maxsize=2)
def contract_server(workers: int = 1) -> LiveServer:
    """The shared contract server; `workers`: its HTTP worker processes."""
    store = tempfile.mkdtemp(prefix="loraplex-contract-store-")
    server = LiveServer(
        "--workers", str(workers),
        "--adapter-store", store, "--max-client-batch", str(MAX_CLIENT_BATCH),
        "--preload", f"tweet-sentiment={DEMO}",
    )  # fmt: skip
    server.start()
    atexit.register(server.stop)
    return server
