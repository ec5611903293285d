"""Extractive question answering: (question, context) pairs into windows for the engine, and the engine's
start and end logits back into answers, as Hugging Face's `question-answering` pipeline reads them.

    rows = windows(tokenizer, [("Who?", "Ada wrote it.")], max_seq_len=512, doc_stride=128)
    logits = engine.classify(rows, [slot] * len(rows))   # [tokens, 2] per window: start, end
    answers(rows, logits, ["Ada wrote it."], top_k=1)
    # [[{"answer": "Ada", "score": ..., "start": 0, "end": 3}]]: per input, characters of its context

A context too long for one row becomes several windows, each the question and a slice of the context
(`truncation="only_second"`), consecutive slices sharing `doc_stride` tokens. Per window, only context
tokens (and the CLS token, for the null answer) take part in a softmax over the start logits and one over
the end logits; a span s..e of context tokens, e >= s, at most `max_answer_len` tokens, scores
p_start[s] * p_end[e]; the best spans of all windows of an input win, mapped to characters of the context
by the tokenizer's offsets (a span found in two overlapping windows counts once, with its better score).
The null answer ("", 0, 0) scores p_start[CLS] * p_end[CLS], the least over the input's windows, and is
ranked with the spans when `handle_impossible_answer` is set.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from loraplex.adapters.errors import InvalidInputError
from loraplex.ipc import Tokens

Pair = tuple[str, str]  # (question, context)


class Window(Tokens):
    """One row: the question and a slice of an input's context, special tokens included.

    Its tokens are all of token type 0: PEFT's question-answering model (`PeftModelForQuestionAnswering`)
    does not pass token types to the encoder, so its adapters are trained and run without them.
    """

    def __init__(
        self,
        ids: list[int],
        *,
        example: int,
        offsets: list[tuple[int, int]],
        context: list[bool],
        scored: list[bool],
    ):
        super().__init__(ids)
        self.example = example  # index of the input in the request
        self.offsets = offsets  # [tokens] (start, end) characters; of the context where `context`
        self.context = context  # [tokens] whether the token is one of the context's
        self.scored = scored  # [tokens] in the softmax: the context's tokens and CLS


def windows(
    tokenizer,
    pairs: list[Pair],
    *,
    max_seq_len: int,
    doc_stride: int,
    max_question_len: int = 64,
    max_rows: int | None = None,
) -> list[Window]:
    """The windows of every input, input by input; an InvalidInputError naming the input when its
    question leaves no room for the context, `doc_stride` is not below that room, or all inputs together
    need more than `max_rows` windows."""
    questions = [_cut_question(tokenizer, q, max_question_len) for q, _ in pairs]
    contexts = [c for _, c in pairs]
    question_ids = _ids(tokenizer, questions)
    context_ids = _ids(tokenizer, contexts)
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    needed = 0
    for i, (q, c) in enumerate(zip(question_ids, context_ids, strict=True)):
        if not q:
            raise InvalidInputError(f"inputs[{i}].question has no tokens; send a question with words in it.")
        if not c:
            raise InvalidInputError(f"inputs[{i}].context has no tokens; send a context with words in it.")
        room = max_seq_len - specials - len(q)
        if room < 1:
            raise InvalidInputError(
                f"inputs[{i}].question takes {len(q)} tokens, which with {specials} special tokens leaves "
                f"no room for the context in max_seq_len={max_seq_len}; shorten the question, lower "
                "max_question_len or raise max_seq_len."
            )
        if doc_stride >= room:
            raise InvalidInputError(
                f"doc_stride is {doc_stride}, but windows of max_seq_len={max_seq_len} tokens leave room for "
                f"{room} context tokens beside inputs[{i}].question; send a doc_stride below {room}."
            )
        needed += 1 if len(c) <= room else 1 + math.ceil((len(c) - room) / (room - doc_stride))
    if max_rows is not None and needed > max_rows:
        raise InvalidInputError(
            f"These contexts need {needed} windows of max_seq_len={max_seq_len} tokens with "
            f"doc_stride={doc_stride}; the server takes at most {max_rows} per request (max_client_batch). "
            "Send shorter "
            "contexts, fewer inputs or a smaller doc_stride."
        )
    encoded = tokenizer(
        questions,
        contexts,
        truncation="only_second",
        max_length=max_seq_len,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_token_type_ids=False,
        return_attention_mask=False,
        verbose=False,
    )
    cls = tokenizer.cls_token_id
    rows = []
    for w, ids in enumerate(encoded["input_ids"]):
        context = [s == 1 for s in encoded.sequence_ids(w)]
        rows.append(
            Window(
                ids,
                example=encoded["overflow_to_sample_mapping"][w],
                offsets=[tuple(o) for o in encoded["offset_mapping"][w]],
                context=context,
                scored=[c or t == cls for c, t in zip(context, ids, strict=True)],
            )
        )
    return rows


def best_spans(
    logits: np.ndarray,  # [T, 2]: start, end
    context: np.ndarray,  # [T] bool: the context's tokens
    scored: np.ndarray,  # [T] bool: the tokens in the softmax (context and CLS)
    top_k: int,
    max_answer_len: int,
) -> tuple[list[tuple[int, int, float]], float]:
    """The top_k spans of one window and its null score:

        p_start = softmax(logits[scored, 0]); p_end = softmax(logits[scored, 1])   # 0 elsewhere
        score(s, e) = p_start[s] * p_end[e]  for context s <= e < s + max_answer_len, e context
        null = p_start[0] * p_end[0]

    Returns ([(s, e, score)], best first; null)."""
    values = np.where(scored[:, None], np.asarray(logits, dtype=np.float64), -math.inf)
    values = np.exp(values - values.max(axis=0))
    p_start, p_end = (values / values.sum(axis=0)).T  # [T] each
    null = float(p_start[0] * p_end[0])
    tokens = len(context)
    span = min(max_answer_len, tokens)
    ends = sliding_window_view(np.concatenate([p_end, np.zeros(span - 1)]), span)  # [T, span]: p_end[s + j]
    end_in_context = sliding_window_view(np.concatenate([context, np.zeros(span - 1, bool)]), span)
    valid = context[:, None] & end_in_context  # [T, span]
    scores = np.where(valid, p_start[:, None] * ends, -1.0).ravel()
    k = min(top_k, int(valid.sum()))
    best = np.argsort(-scores, kind="stable")[:k]  # ties: the earlier span first, as torch.topk on CPU
    spans = []
    for index in best.tolist():
        start, length = divmod(index, span)
        spans.append((start, start + length, float(scores[index])))
    return spans, null


def answers(
    rows: list[Window],
    logits: list[np.ndarray],  # [tokens, 2] per row
    contexts: list[str],
    *,
    top_k: int = 1,
    max_answer_len: int = 15,
    handle_impossible_answer: bool = False,
) -> list[list[dict]]:
    """Per input, up to top_k `{"answer", "score", "start", "end"}` (characters of its context), best
    first."""
    found: list[dict[tuple[int, int], float]] = [{} for _ in contexts]  # (start, end) char -> best score
    null = [math.inf] * len(contexts)
    for row, output in zip(rows, logits, strict=True):
        context = np.array(row.context, dtype=bool)
        scored = np.array(row.scored, dtype=bool)
        spans, null_score = best_spans(output, context, scored, top_k, max_answer_len)
        i = row.example
        null[i] = min(null[i], null_score)
        for s, e, score in spans:
            chars = (row.offsets[s][0], row.offsets[e][1])
            found[i][chars] = max(score, found[i].get(chars, -1.0))
    results = []
    for i, context in enumerate(contexts):
        ranked = [
            {"answer": context[start:end], "score": score, "start": start, "end": end}
            for (start, end), score in found[i].items()
        ]
        if handle_impossible_answer:
            ranked.append({"answer": "", "score": null[i], "start": 0, "end": 0})
        ranked.sort(key=lambda a: (-a["score"], a["start"], a["end"]))
        results.append(ranked[:top_k])
    return results


def _cut_question(tokenizer, question: str, max_question_len: int) -> str:
    """The question cut after its first `max_question_len` tokens."""
    offsets = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True, verbose=False)[
        "offset_mapping"
    ]
    return question if len(offsets) <= max_question_len else question[: offsets[max_question_len - 1][1]]


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
