"""Texts and text pairs into token rows for the engine: special tokens, token types, truncation.

    rows = encode(tokenizer, 512, ["a text", ("premise", "hypothesis")], truncate=True, direction="right")
    rows[1]             # token ids, special tokens included (a list)
    rows[1].type_start  # where token type 1 (the pair's second text) begins; len(row) when never
    rows[1].truncated   # whether the input was cut to fit the model

Texts are cut as Hugging Face's tokenizer cuts them with `truncation=True` (`longest_first` for pairs)
on the side `direction` names; the tokenizer's own special tokens and separators are kept.

A fast tokenizer is called through its own Rust tokenizer (`encode_batch` on copies configured once: no
truncation, or truncation at a length on a side), which gives the same ids as calling the Hugging Face
tokenizer for half its cost per request; a slow tokenizer is called as it is.
"""

from __future__ import annotations

import copy
import threading
import weakref

from loraplex.adapters.errors import InvalidInputError
from loraplex.ipc import Tokens

Text = str | tuple[str, str]  # one text, or a pair (text, text_pair)
DIRECTIONS = ("right", "left")

_lock = threading.Lock()
_left: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> a copy cutting on the left
_rust: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its RustTokenizers (or None)


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
        full = tokenize(tokenizer, [texts[i] for i in where])
        long = [k for k, (ids, _) in enumerate(full) if len(ids) > max_length]
        if long and not truncate:
            k = long[0]
            raise InvalidInputError(
                f"Input {where[k]} has {len(full[k][0])} tokens, more than the model's maximum "
                f"of {max_length}; shorten it or send truncate=true."
            )
        cut = tokenize(tokenizer, [texts[where[k]] for k in long], max_length, direction) if long else []
        cut_rows = {k: n for n, k in enumerate(long)}
        for k, i in enumerate(where):
            ids, types = cut[cut_rows[k]] if k in cut_rows else full[k]
            start = types.index(1) if types is not None and 1 in types else None
            rows[i] = Tokens(ids, start, truncated=k in cut_rows)
    return rows


def tokenize(
    tokenizer, texts: list[Text], max_length: int | None = None, direction: str = "right"
) -> list[tuple[list[int], list[int] | None]]:
    """(token ids, token type ids or None where the model has none) per input, all texts or all pairs;
    cut at `max_length` on the `direction` side when it is given."""
    types = "token_type_ids" in tokenizer.model_input_names
    rust = _rust_tokenizers(tokenizer)
    if rust is None:
        encoded = _call(_side(tokenizer, direction), texts, max_length)
        type_ids = encoded["token_type_ids"] if types else [None] * len(texts)
        return list(zip(encoded["input_ids"], type_ids, strict=True))
    encodings = rust.get(max_length, direction).encode_batch(texts, add_special_tokens=True)
    return [(e.ids, e.type_ids if types else None) for e in encodings]


class RustTokenizers:
    """A fast tokenizer's Rust tokenizer, copied once per setting that Hugging Face's call would switch
    on it before each call (truncation at a length on a side, no padding, special tokens in the text
    split or not), so that a request's call changes no shared state."""

    def __init__(self, tokenizer):
        self.source = tokenizer._tokenizer.to_str()
        self.split_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
        self.copies: dict[tuple[int | None, str], object] = {}

    def get(self, max_length: int | None, direction: str):
        key = (max_length, direction if max_length is not None else "right")
        copy_ = self.copies.get(key)
        if copy_ is None:
            from tokenizers import Tokenizer

            copy_ = Tokenizer.from_str(self.source)
            copy_.no_padding()
            if max_length is None:
                copy_.no_truncation()
            else:
                copy_.enable_truncation(max_length, stride=0, strategy="longest_first", direction=direction)
            copy_.encode_special_tokens = self.split_special_tokens
            with _lock:
                copy_ = self.copies.setdefault(key, copy_)
        return copy_


# Where a tokenizer class could change what a call encodes: one that defines any of these itself (below
# the library's fast tokenizer) is called as it is.
_CALL_PATH = (
    "__call__", "_call_one", "encode_plus", "batch_encode_plus", "_encode_plus", "_batch_encode_plus",
)  # fmt: skip


def _rust_tokenizers(tokenizer) -> RustTokenizers | None:
    """The Rust copies of a fast tokenizer; None for a slow one, or one whose class changes the call."""
    try:
        return _rust[tokenizer]
    except KeyError:
        pass
    with _lock:
        return _rust.setdefault(tokenizer, RustTokenizers(tokenizer) if _plain_fast(tokenizer) else None)


def _plain_fast(tokenizer) -> bool:
    try:
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast
    except ImportError:  # pragma: no cover - transformers' fast tokenizers need both
        return False
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return False
    if not isinstance(getattr(tokenizer, "_tokenizer", None), Tokenizer):
        return False
    for klass in type(tokenizer).__mro__:
        if klass is PreTrainedTokenizerFast:
            return True
        if any(name in vars(klass) for name in _CALL_PATH):
            return False
    return False


def _call(tokenizer, texts: list[Text], max_length: int | None = None) -> dict:
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
    with _lock:
        left = _left.get(tokenizer)
        if left is None:
            left = copy.deepcopy(tokenizer)
            left.truncation_side = "left"
            _left[tokenizer] = left
        return left
