"""Every failure leaves as `{"error": "<sentence>", "error_type": "<kind>"}`; the one error -> HTTP map."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from loraplex.adapters.errors import LoraplexError

STATUS = {
    "validation": 422,
    "bad_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "conflict": 409,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "overloaded": 429,
    "unavailable": 503,
    "internal": 500,
}


class UnauthorizedError(LoraplexError):
    """A missing or wrong bearer token (an HTTP-layer concern: the core never raises it)."""

    error_type = "unauthorized"


def error_response(status: int, error_type: str, message: str, headers: dict | None = None) -> Response:
    # ensure_ascii: a message may quote client text, and lone surrogates must not break the encoder.
    body = json.dumps({"error": message, "error_type": error_type}, ensure_ascii=True)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def response_for(exc: LoraplexError) -> Response:
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if exc.error_type == "unauthorized":
        headers["WWW-Authenticate"] = "Bearer"
    return error_response(STATUS.get(exc.error_type, 500), exc.error_type, exc.message, headers)


_SENTENCES = ("missing", "extra_forbidden", "value_error")


def describe_validation(errors: list[dict]) -> str:
    """FastAPI/pydantic errors as one sentence naming each field, without echoing the client's values."""
    parts = []
    for err in errors[:5]:
        loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "request"
        kind = err.get("type")
        if kind == "missing":
            message = "is required"
        elif kind == "extra_forbidden":
            message = "is not a field of this request"
        else:
            message = str(err.get("msg", "is not valid")).removeprefix("Value error, ")
        joiner = "" if message.startswith(("[", ".")) else " " if kind in _SENTENCES else ": "
        # A check of the whole body (which fields go together) names its fields itself.
        parts.append(message if not loc and kind == "value_error" else f"{where}{joiner}{message}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "Invalid request: " + "; ".join(parts) + more + "."


async def _loraplex_error(request: Request, exc: LoraplexError) -> Response:
    return response_for(exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return error_response(422, "validation", describe_validation(list(exc.errors())))


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        message = f"There is no route {request.method} {request.url.path}; see /docs for the API."
        return error_response(404, "not_found", message, headers)
    if exc.status_code == 405:
        # Starlette names the methods of the first route whose path matched; Allow lists every route's.
        given = next((v for k, v in headers.items() if k.lower() == "allow"), "")
        allowed = ", ".join(allowed_methods(request)) or given
        headers = {k: v for k, v in headers.items() if k.lower() != "allow"} | {"Allow": allowed}
        message = f"{request.method} is not allowed on {request.url.path}; use {allowed or 'another method'}."
        return error_response(405, "bad_request", message, headers)
    error_type = next((k for k, v in STATUS.items() if v == exc.status_code), "bad_request")
    return error_response(exc.status_code, error_type, str(exc.detail), headers)


INTERNAL = "Internal server error; the server log has the details."

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """The methods that some route of the app answers on this request's path."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after this response, so the server log gets the traceback once.
    return error_response(500, "internal", INTERNAL)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(LoraplexError, _loraplex_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
