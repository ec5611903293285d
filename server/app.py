"""The FastAPI app: `create_app(settings)` builds it; the lifespan loads the model and starts the batcher.

Loading runs in the background so that /health answers at once and /ready says 503 until the model is
warm. `app.state` holds settings, metrics and `phase` ("loading" -> "ready" -> "draining", or "failed"),
and once ready: engine, store, registry, batcher and the tokenizer's thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from loraplex.adapters.errors import InvalidAdapterError, LoraplexError
from loraplex.adapters.registry import Registry
from loraplex.adapters.store import open_store
from loraplex.batcher import Batcher, EngineThread
from loraplex.engine import Engine
from loraplex.errors import install_error_handlers
from loraplex.metrics import Metrics
from loraplex.middleware import ServingMiddleware
from loraplex.openapi import install_openapi
from loraplex.routes import adapters, answer, classify, docs, embed, health, rerank, tokens
from loraplex.settings import Settings

log = logging.getLogger("loraplex.app")


def create_app(settings: Settings, *, engine_factory: Callable[..., Engine] = Engine) -> FastAPI:
    """The app for `settings`; `engine_factory` is called like `Engine` to build the engine at start-up."""
    app = FastAPI(
        title="loraplex",
        summary="One frozen BERT, many LoRA classification adapters, one forward pass.",
        lifespan=_lifespan,
        docs_url=None,  # /docs and /redoc come from routes.docs, with their assets served locally
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine_factory = engine_factory
    app.state.metrics = Metrics(settings.metrics_max_adapters)
    app.state.phase = "loading"
    app.state.failure = None  # the exception that stopped start-up
    app.state.inflight = 0  # requests on work routes, for the drain
    app.state.engine = app.state.store = app.state.registry = app.state.batcher = app.state.tokenizer = None
    app.state.metrics.in_flight.set_function(lambda: app.state.inflight)
    install_error_handlers(app)
    app.add_middleware(ServingMiddleware)
    app.include_router(health.router)
    app.include_router(classify.router)
    app.include_router(embed.router)
    app.include_router(rerank.router)
    app.include_router(answer.router)
    app.include_router(tokens.router)
    app.include_router(adapters.router)
    app.include_router(docs.router)
    install_openapi(app, max_client_batch=settings.max_client_batch)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    starting = asyncio.create_task(_start(app))
    try:
        yield
    finally:
        if not starting.done():
            starting.cancel()
        batcher: Batcher | None = app.state.batcher
        if batcher is not None:
            await batcher.stop()
        if app.state.registry is not None:
            await app.state.registry.close()
        if app.state.tokenizer is not None:
            app.state.tokenizer.shutdown(wait=False, cancel_futures=True)


async def _start(app: FastAPI) -> None:
    s: Settings = app.state.settings
    thread = EngineThread()  # the engine is built, warmed up and run on this one thread
    try:
        engine = await thread.run(
            app.state.engine_factory,  # Engine unless create_app was given another
            s.model,
            device=s.device,
            dtype=s.dtype,
            num_slots=s.max_resident,
            max_rank=s.max_rank,
            max_labels=s.max_labels,
        )
        store = await asyncio.to_thread(open_store, s.adapter_store)
        registry = Registry(
            store,
            engine,
            max_host_cache=s.max_host_cache,
            staleness_s=s.staleness_s,
            max_rank=s.max_rank,
            max_labels=s.max_labels,
        )
        for adapter_id, folder in s.preload_items():
            try:
                record, _ = await registry.import_dir(adapter_id, folder)
            except LoraplexError as exc:
                raise InvalidAdapterError(f"--preload {adapter_id}={folder}: {exc.message}") from exc
            log.info("preloaded adapter %s version %s from %s", adapter_id, record.version, folder)
        await thread.run(engine.warmup)
    except asyncio.CancelledError:  # shut down while loading
        thread.close()
        raise
    except Exception as exc:
        thread.close()
        app.state.failure = exc
        app.state.phase = "failed"
        return
    metrics: Metrics = app.state.metrics
    metrics.watch_registry(registry)
    batcher = Batcher(
        engine,
        registry,
        metrics,
        max_batch_tokens=s.max_batch_tokens,
        max_batch_size=s.max_batch_size,
        max_wait_s=s.max_wait_ms / 1000,
        max_queued=s.max_queued,
        thread=thread,
    )
    batcher.start()
    registry.start()
    metrics.queue_depth.set_function(lambda: batcher.depth)
    app.state.engine = engine
    app.state.store = store
    app.state.registry = registry
    app.state.batcher = batcher
    # One thread: tokenization stays off the event loop and never runs concurrently with itself.
    app.state.tokenizer = ThreadPoolExecutor(1, thread_name_prefix="loraplex-tokenize")
    app.state.phase = "ready"
    log.info(
        "ready: %s on %s, %d slots, batches of up to %d rows / %d tokens",
        s.model or "all-MiniLM-L6-v2", engine.device, engine.num_slots, s.max_batch_size, s.max_batch_tokens,
    )  # fmt: skip
