"""The inference routes without the framework's per-request machinery.

An inference route reads and parses its own body, checks auth with a request-only dependency and returns
a finished Response, so routing by exact path, that one check and the call are all it needs. `LeanApp`
runs such routes directly: a POST to one of their paths goes through `ServingMiddleware` (admission,
body limit, in-flight count, metrics) to the endpoint, and everything else (other routes, other methods,
404s, the docs) through the whole FastAPI stack as before. Errors are answered by the same handlers
(`loraplex.http.errors`), so a client cannot tell the two paths apart.

Which routes qualify is read from the routes themselves (`lean_endpoints`): a POST route without path,
query, header, cookie or body parameters whose dependencies are coroutines of the request alone.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, APIRouter
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from loraplex.adapters.errors import LoraplexError
from loraplex.http.errors import INTERNAL, error_response, response_for
from loraplex.http.middleware import ServingMiddleware

log = logging.getLogger("loraplex.http.lean")


@dataclass(frozen=True)
class LeanEndpoint:
    route: APIRoute
    request_name: str  # the endpoint's Request parameter
    checks: tuple[tuple[str, Callable[[Request], Awaitable[object]]], ...]  # (parameter, dependency)


class LeanApp(FastAPI):
    """FastAPI, with the qualifying POST routes of `include_lean` called directly."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.lean: dict[str, LeanEndpoint] = {}
        self.lean_stack = ServingMiddleware(self._call_lean)

    def include_lean(self, router: APIRouter) -> None:
        """`include_router(router)` (no prefix, no dependencies of its own), and its qualifying routes
        on the lean path."""
        self.include_router(router)
        self.lean.update(lean_endpoints(router.routes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.lean.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self
                scope["route"] = endpoint.route  # the metrics' route label
                await self.lean_stack(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _call_lean(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint: LeanEndpoint = self.lean[scope["path"]]
        request = Request(scope, receive)
        try:
            arguments = {endpoint.request_name: request}
            for name, check in endpoint.checks:
                arguments[name] = await check(request)
            response = await endpoint.route.endpoint(**arguments)
            if not isinstance(response, Response):
                raise TypeError(f"{endpoint.route.path} returned {type(response).__name__}, not a Response")
        except LoraplexError as exc:
            response = response_for(exc)
        except Exception:
            log.exception("POST %s failed", endpoint.route.path)
            response = error_response(500, "internal", INTERNAL)
        await response(scope, receive, send)


def lean_endpoints(routes: Iterable[BaseRoute]) -> dict[str, LeanEndpoint]:
    """Path -> endpoint for every POST-only route that the lean path can call exactly as FastAPI would."""
    found = {}
    for route in routes:
        if not isinstance(route, APIRoute) or route.methods != {"POST"} or "{" in route.path:
            continue
        dependant = route.dependant
        if _has_params(dependant) or dependant.request_param_name is None:
            continue
        if not inspect.iscoroutinefunction(route.endpoint):
            continue
        checks = []
        for dependency in dependant.dependencies:
            if (
                dependency.dependencies
                or _has_params(dependency)
                or dependency.request_param_name is None
                or not inspect.iscoroutinefunction(dependency.call)
                or dependency.name is None
            ):
                break
            checks.append((dependency.name, _request_only(dependency)))
        else:
            found[route.path] = LeanEndpoint(route, dependant.request_param_name, tuple(checks))
    return found


def _has_params(dependant: Dependant) -> bool:
    return bool(
        dependant.path_params
        or dependant.query_params
        or dependant.header_params
        or dependant.cookie_params
        or dependant.body_params
        or dependant.response_param_name
        or dependant.background_tasks_param_name
        or dependant.websocket_param_name
        or dependant.security_scopes_param_name
        or dependant.http_connection_param_name
    )


def _request_only(dependency: Dependant) -> Callable[[Request], Awaitable[object]]:
    call, name = dependency.call, dependency.request_param_name

    async def check(request: Request) -> object:
        return await call(**{name: request})

    return check
