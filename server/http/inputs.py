"""Texts and text pairs into token rows for the engine: special tokens, token types, truncation.

    rows = encode(tokenizer, 512, ["a text", ("premise", "hypothesis")], truncate=True, direction="right")
    rows[1]             # token ids, special tokens included (a list)
    rows[1].type_start  # where token type 1 (the pair's second text) begins; len(row) when never
    rows[1].truncated   # whether the input was cut to fit the model

Texts are cut as Hugging Face's tokenizer cuts them with `truncation=True` (`longest_first` for pairs)
on the side `direction` names; the tokenizer's own special tokens and separators are kept.
"""

from __future__ import annotations

import copy
import threading

from loraplex.adapters.errors import InvalidInputError
from loraplex.ipc import Tokens

Text = str | tuple[str, str]  # one text, or a pair (text, text_pair)
DIRECTIONS = ("right", "left")

_left_lock = threading.Lock()
_left: dict[int, object] = {}  # id(tokenizer) -> a copy of it that truncates on the left


def encode(
    tokenizer, max_length: int, texts: list[Text], *, truncate: bool = True, direction: str = "right"
) -> list[Tokens]:
    """One `Tokens` per input; an input longer than `max_length` tokens is cut, or with `truncate`
    false an InvalidInputError naming its index and token count."""
    rows: list[Tokens | None] = [None] * len(texts)
    for pairs in (False, True):
        where = [i for i, t in enumerate(texts) if isinstance(t, tuple) == pairs]
        if not where:
            continue
        full = _tokenize(tokenizer, [texts[i] for i in where])
        long = [k for k, ids in enumerate(full["input_ids"]) if len(ids) > max_length]
        if long and not truncate:
            k = long[0]
            raise InvalidInputError(
                f"Input {where[k]} has {len(full['input_ids'][k])} tokens, more than the model's maximum "
                f"of {max_length}; shorten it or send truncate=true."
            )
        cut = (
            _tokenize(_side(tokenizer, direction), [texts[where[k]] for k in long], max_length)
            if long
            else {}
        )
        cut_rows = {k: n for n, k in enumerate(long)}
        for k, i in enumerate(where):
            source, n = (cut, cut_rows[k]) if k in cut_rows else (full, k)
            ids = source["input_ids"][n]
            types = source.get("token_type_ids")
            start = types[n].index(1) if types is not None and 1 in types[n] else None
            rows[i] = Tokens(ids, start, truncated=k in cut_rows)
    return rows


def _tokenize(tokenizer, texts: list[Text], max_length: int | None = None) -> dict:
    pairs = isinstance(texts[0], tuple)
    firsts = [t[0] for t in texts] if pairs else texts
    seconds = [t[1] for t in texts] if pairs else None
    # Token types only where the model has them (BERT, ELECTRA, DeBERTa tokenizers return them).
    types = "token_type_ids" in tokenizer.model_input_names
    return tokenizer(
        firsts,
        seconds,
        add_special_tokens=True,
        truncation=max_length is not None,
        max_length=max_length,
        return_token_type_ids=types,
        return_attention_mask=False,
        verbose=False,
    )


def _side(tokenizer, direction: str):
    """The tokenizer, or a copy of it that truncates on the left (kept: the setting is per tokenizer)."""
    if direction == "right":
        return tokenizer
    with _left_lock:
        left = _left.get(id(tokenizer))
        if left is None:
            left = copy.deepcopy(tokenizer)
            left.truncation_side = "left"
            _left[id(tokenizer)] = left
        return left
