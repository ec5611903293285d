"""Operations routes: liveness, readiness, Prometheus metrics. Never queued; /metrics needs the metrics
token when one is set."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from loraplex.adapters.errors import LoraplexError
from loraplex.http.auth import MetricsAuth
from loraplex.http.errors import error_response
from loraplex.http.schemas import ERROR_RESPONSES, ErrorBody, Health, Status

router = APIRouter(tags=["operations"])
STATS_TIMEOUT_S = 2.0  # a scrape does not wait longer than this for the engine process's gauges

_NOT_READY = {
    "loading": "The model is loading and warming up.",
    "draining": "The server is shutting down and takes no new requests.",
    "failed": "The server failed to start; see its log.",
}


@router.get("/health", response_model=Health)
async def health(request: Request) -> dict:
    """200 while the process serves requests; says whether inference is open to anyone."""
    return {"status": "ok", "anonymous_inference": request.app.state.settings.anonymous_inference}


_NOT_READY_RESPONSE = {
    "model": ErrorBody,
    "description": "loading, draining or failed; see Retry-After",
    "content": {
        "application/json": {"example": {"error": _NOT_READY["loading"], "error_type": "unavailable"}}
    },
}


@router.get("/ready", response_model=Status, responses={503: _NOT_READY_RESPONSE})
async def ready(request: Request) -> Response | dict:
    """200 once the model is warm; 503 while loading and again from the moment shutdown begins."""
    phase = request.app.state.phase
    if phase != "ready":
        return error_response(503, "unavailable", _NOT_READY[phase], {"Retry-After": "1"})
    return {"status": "ready"}


_METRICS_EXAMPLE = (
    "# HELP loraplex_requests_total HTTP requests by route template, method (unknown: 'other') and status.\n"
    "# TYPE loraplex_requests_total counter\n"
    'loraplex_requests_total{method="POST",route="/classify",status="200"} 42.0\n'
)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}, "example": _METRICS_EXAMPLE}},
        },
        401: {**ERROR_RESPONSES[401], "description": "a metrics token is set and the request lacks it"},
    },
)
async def metrics(request: Request, _: MetricsAuth) -> Response:
    """Prometheus text format; every metric starts with `loraplex_`: every process of the server."""
    state = request.app.state
    stats = None
    if state.phase in ("ready", "draining"):
        with contextlib.suppress(LoraplexError, TimeoutError):
            async with asyncio.timeout(STATS_TIMEOUT_S):
                stats = await state.client.call("stats")
    return Response(state.metrics.render(stats), media_type=CONTENT_TYPE_LATEST)
