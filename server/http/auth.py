"""Bearer-token auth: `api_key` guards inference and reads, `admin_token` guards adapter writes.

Tokens are compared in constant time and never logged; an unset API key leaves its routes open (settings
refuse that on a non-loopback host unless --allow-anonymous-inference says so). A metrics token guards
/metrics. An unset
admin token leaves adapter writes open only on a loopback host, or with --allow-unauthenticated-writes:
on any other interface they get 401 with a sentence on how to enable them.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr

from loraplex.http.errors import UnauthorizedError


def _bearer(request: Request) -> bytes | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    # Starlette decodes header bytes as latin-1; encoding back gives the exact bytes the client sent.
    return token.strip().encode("latin-1")


def _matches(token: bytes, secret: SecretStr | None) -> bool:
    return secret is not None and hmac.compare_digest(token, secret.get_secret_value().encode("utf-8"))


def _check(request: Request, accepted: tuple[SecretStr | None, ...], what: str) -> None:
    if all(secret is None for secret in accepted):
        return
    token = _bearer(request)
    if token is None:
        raise UnauthorizedError(f"{what} needs an 'Authorization: Bearer <token>' header.")
    # Compare against every accepted secret so the time taken does not reveal which one matched.
    if not any([_matches(token, secret) for secret in accepted]):
        raise UnauthorizedError(f"The bearer token is not valid for {what}.")


async def require_api_key(request: Request) -> None:
    """Inference and adapter reads: the API key or the admin token, when an API key is set."""
    settings = request.app.state.settings
    if settings.api_key is not None:
        _check(request, (settings.api_key, settings.admin_token), "this route")


async def require_metrics_token(request: Request) -> None:
    """/metrics: the metrics token (or the admin token), when a metrics token is set."""
    settings = request.app.state.settings
    if settings.metrics_token is not None:
        _check(request, (settings.metrics_token, settings.admin_token), "/metrics")


async def require_admin(request: Request) -> None:
    """Adapter writes (PUT, DELETE): the admin token; without one, only on loopback or when allowed."""
    settings = request.app.state.settings
    if settings.admin_token is None and not (settings.loopback_only or settings.allow_unauthenticated_writes):
        raise UnauthorizedError(
            f"Adapter writes are off: this server listens on {settings.host} and has no admin token. "
            "Set LORAPLEX_ADMIN_TOKEN (or LORAPLEX_ADMIN_TOKEN_FILE) and send it as "
            "'Authorization: Bearer <token>', or start the server with --allow-unauthenticated-writes "
            "to let anyone who can reach it change adapters."
        )
    _check(request, (settings.admin_token,), "changing adapters")


# Both checks are coroutines although they never wait: FastAPI runs a plain function dependency on its
# thread pool, a thread hop (and a wake-up of the event loop) on every request.
ApiKeyAuth = Annotated[None, Depends(require_api_key)]
AdminAuth = Annotated[None, Depends(require_admin)]
MetricsAuth = Annotated[None, Depends(require_metrics_token)]
