"""Which inference route serves which adapter task, and what a route needs of an adapter.

`check_route` runs in the engine process, where the adapter's current version is resolved, before its rows
are queued; the listing and the error messages name the route of each task.
"""

from __future__ import annotations

from loraplex.adapters.errors import InvalidInputError
from loraplex.adapters.peft import FEATURE_EXTRACTION, QUESTION_ANS, SEQ_CLS, TOKEN_CLS

ROUTES = {SEQ_CLS: "/classify", TOKEN_CLS: "/tokens", QUESTION_ANS: "/answer", FEATURE_EXTRACTION: "/embed"}
# The task each inference route serves.
ROUTE_TASKS = {
    "/classify": SEQ_CLS,
    "/predict": SEQ_CLS,
    "/rerank": SEQ_CLS,
    "/tokens": TOKEN_CLS,
    "/answer": QUESTION_ANS,
    "/embed": FEATURE_EXTRACTION,
    "/v1/embeddings": FEATURE_EXTRACTION,
}
_WHAT = {
    SEQ_CLS: "sequence classification",
    TOKEN_CLS: "token classification",
    QUESTION_ANS: "extractive question answering",
    FEATURE_EXTRACTION: "embedding",
}


def routes_of(task_type: str | None, num_labels: int) -> list[str]:
    """The inference routes that serve an adapter of `task_type` with `num_labels` outputs."""
    if task_type is None:
        return []
    if task_type == SEQ_CLS:
        return ["/classify", "/predict", "/rerank"] if num_labels == 1 else ["/classify", "/predict"]
    if task_type == FEATURE_EXTRACTION:
        return ["/embed", "/v1/embeddings"]
    return [ROUTES[task_type]]


def require_task(handle, task: str, route: str) -> None:
    """422 naming the adapter's task and the route that serves it, unless the adapter is of `task`."""
    own = handle.task
    if own != task:
        raise InvalidInputError(
            f"Adapter {handle.adapter_id!r} is a {own} ({_WHAT[own]}) adapter, not {task}; send its "
            f"requests to POST {ROUTES[own]} instead of {route}."
        )


def check_route(handle, route: str, top_k: int | None = None) -> None:
    """What `route` needs of the adapter before its rows are queued: its task, enough labels for
    `top_k`, and for /rerank a cross-encoder's single output."""
    require_task(handle, ROUTE_TASKS[route], route)
    check_top_k(top_k, handle)
    if route == "/rerank" and len(handle.labels) != 1:
        raise InvalidInputError(
            f"Adapter {handle.adapter_id!r} has {len(handle.labels)} labels; /rerank needs a "
            "cross-encoder with one output (its relevance logit). Send its requests to POST /classify."
        )


def check_top_k(top_k: int | None, handle) -> None:
    count = len(handle.labels)
    if top_k is not None and top_k > count:
        raise InvalidInputError(
            f"top_k is {top_k}, but adapter {handle.adapter_id!r} has {count} labels; send 1..{count}."
        )
