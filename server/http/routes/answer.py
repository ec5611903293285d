"""POST /answer: extractive question answering with a QUESTION_ANS adapter; answers in input order.

Every window of every context is a row of one job, so they are batched with the rest of the queue and
the request sees one adapter version; `loraplex.http.qa` makes the windows and reads the answers back.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from loraplex.adapters.errors import InvalidInputError
from loraplex.http.auth import ApiKeyAuth
from loraplex.http.postprocess import check_finite
from loraplex.http.qa import answers, windows
from loraplex.http.routes.inference import (
    body_schema,
    check_batch,
    infer,
    parse_body,
    read_body,
    required_adapter,
    respond,
)
from loraplex.http.schemas import ERROR_RESPONSES, AnswerRequest, AnswerResponse

router = APIRouter(tags=["inference"])


@router.post(
    "/answer",
    response_model=AnswerResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=body_schema(AnswerRequest),
)
async def answer(request: Request, _auth: ApiKeyAuth) -> Response:
    """Up to top_k spans of each context that answer its question, best first; results in input order.
    The adapter: `adapter_id`, or the X-Adapter-Id header."""
    body = parse_body(await read_body(request), request.headers.get("content-type"), AnswerRequest)
    pairs = body.pairs()
    chosen = check_batch(request, len(pairs), body.adapter_id, "questions")
    adapter_id = required_adapter(chosen, "/answer", "an extractive question-answering (QUESTION_ANS)")
    base = request.app.state.base
    limit = base.max_length

    def tokenize():
        if body.max_seq_len is not None and body.max_seq_len > limit:
            raise InvalidInputError(
                f"max_seq_len is {body.max_seq_len}, more than the model's maximum of {limit}; send at "
                f"most {limit}, or leave it out for {limit}."
            )
        return windows(
            base.tokenizer,
            pairs,
            max_seq_len=body.max_seq_len or limit,
            doc_stride=body.doc_stride,
            max_question_len=body.max_question_len,
            # Each window is a row of the engine: a request gets no more rows than max_client_batch inputs.
            max_rows=request.app.state.settings.max_client_batch,
        )

    run = await infer(request, adapter_id, "/answer", tokenize)
    if run.early is not None:
        return run.early
    for logits in run.outputs:
        check_finite(logits, run.handle)
    results = answers(
        run.rows,
        run.outputs,
        [context for _, context in pairs],
        top_k=body.top_k,
        max_answer_len=body.max_answer_len,
        handle_impossible_answer=body.handle_impossible_answer,
    )
    return respond(request, run, {"results": results}, len(pairs))
