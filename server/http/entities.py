"""Token classification answers as Hugging Face's `token-classification` pipeline gives them.

    pieces = token_pieces(tokenizer, texts, max_length)  # on the tokenizer thread, as the rows are cut
    found = entities(pieces[i], logits, labels, tokenizer, "simple", ["O"])  # logits: [tokens, labels]

A token's scores are the softmax over the adapter's labels. Special tokens are skipped. With aggregation
"none" each remaining token is an entity (`entity`, `score`, `index`, `word`, `start`, `end`); otherwise
neighbouring tokens are grouped into an `entity_group` by their tags: `B-X` starts a group of X, `I-X`
(or a plain `X`) continues one. "first", "average" and "max" first make the pieces of one word agree on a
label (the first piece's, the mean of their scores, the piece with the highest score), so that a word is
never split; "simple" groups tokens as they are. Labels in `ignore_labels` are dropped at the end.
`start`/`end` are character offsets in the input text (None where the tokenizer has no offsets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loraplex.adapters.errors import InvalidInputError
from loraplex.http.postprocess import softmax

WORD_AGGREGATIONS = ("first", "average", "max")  # need a tokenizer that knows word boundaries


@dataclass(frozen=True)
class Piece:
    """One non-special token of an input: where it is in the row and in the text."""

    index: int  # position in the row, special tokens included
    word: str  # the token as the tokenizer spells it ("##kel"), or the text itself for an unknown token
    start: int | None  # character offsets in the text; None without a fast tokenizer
    end: int | None
    is_subword: bool  # continues the word of the piece before it


def check_aggregation(aggregation: str, tokenizer) -> None:
    """422 for word aggregation on a tokenizer without offsets, as the pipeline refuses it."""
    if aggregation in WORD_AGGREGATIONS and not tokenizer.is_fast:
        raise InvalidInputError(
            f'aggregation "{aggregation}" needs word boundaries, which this model\'s (slow) tokenizer does '
            'not give; send aggregation "simple" or "none".'
        )


def token_pieces(tokenizer, texts: list[str], max_length: int, side_tokenizer=None) -> list[list[Piece]]:
    """The pieces of each text, tokenized as `loraplex.http.inputs.encode` tokenizes it (cut to `max_length`
    by `side_tokenizer`, the tokenizer that truncates on the request's side; default `tokenizer`)."""
    fast = tokenizer.is_fast
    encoded = (side_tokenizer or tokenizer)(
        texts,
        add_special_tokens=True,
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=fast,
        return_special_tokens_mask=True,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )
    # A tokenizer with a continuing-subword prefix ("##") marks word pieces itself; others are judged by
    # whether a space precedes the piece in the text (the pipeline's fallback).
    model = getattr(getattr(tokenizer, "_tokenizer", None), "model", None)
    marks_subwords = bool(getattr(model, "continuing_subword_prefix", None))
    result = []
    for n, text in enumerate(texts):
        ids = encoded["input_ids"][n]
        special = encoded["special_tokens_mask"][n]
        offsets = encoded["offset_mapping"][n] if fast else None
        words = tokenizer.convert_ids_to_tokens(ids)
        pieces = []
        for index, (token_id, word) in enumerate(zip(ids, words, strict=True)):
            if special[index]:
                continue
            start = end = None
            is_subword = False
            if offsets is not None:
                start, end = offsets[index]
                spelled = text[start:end]
                if marks_subwords:
                    is_subword = len(word) != len(spelled)
                else:
                    is_subword = start > 0 and " " not in text[start - 1 : start + 1]
                if token_id == tokenizer.unk_token_id:
                    word, is_subword = spelled, False
            pieces.append(Piece(index, word, start, end, is_subword))
        result.append(pieces)
    return result


def entities(
    pieces: list[Piece],
    logits: np.ndarray,  # [tokens, labels] of the row the pieces index
    labels: tuple[str, ...] | list[str],
    tokenizer,
    aggregation: str = "simple",
    ignore_labels: list[str] | tuple[str, ...] = ("O",),
) -> list[dict]:
    """The row's entities, in text order, as the token-classification pipeline reports them."""
    # Plain lists from here on: a few labels per token are cheaper in Python than one tensor op each.
    scores = softmax(np.asarray(logits, dtype=np.float32)).tolist()  # [tokens][labels]
    if aggregation in ("none", "simple"):
        tagged = []
        for piece in pieces:
            row = scores[piece.index]
            best = _argmax(row)
            tagged.append(
                {
                    "entity": labels[best],
                    "score": row[best],
                    "index": piece.index,
                    "word": piece.word,
                    "start": piece.start,
                    "end": piece.end,
                }
            )
        if aggregation == "none":
            return [entity for entity in tagged if entity["entity"] not in ignore_labels]
    else:
        tagged = [_word(word, scores, labels, tokenizer, aggregation) for word in _words(pieces)]
    groups = [_group(run, tokenizer) for run in _runs(tagged)]
    return [group for group in groups if group["entity_group"] not in ignore_labels]


def _argmax(values: list[float]) -> int:
    """The index of the first largest value (as numpy's and torch's argmax)."""
    return max(range(len(values)), key=values.__getitem__)


def _words(pieces: list[Piece]) -> list[list[Piece]]:
    """Pieces joined into words: a piece that is a subword continues the word before it."""
    words: list[list[Piece]] = []
    for piece in pieces:
        if words and piece.is_subword:
            words[-1].append(piece)
        else:
            words.append([piece])
    return words


def _word(word: list[Piece], scores: list[list[float]], labels, tokenizer, aggregation: str) -> dict:
    """One label for a word's pieces: the first piece's, the most confident piece's, or their mean's."""
    rows = [scores[piece.index] for piece in word]  # [pieces][labels]
    if aggregation == "first":
        chosen = rows[0]
    elif aggregation == "max":
        chosen = max(rows, key=max)  # the first piece with the highest score
    else:
        chosen = [sum(column) / len(rows) for column in zip(*rows, strict=True)]
    best = _argmax(chosen)
    return {
        "entity": labels[best],
        "score": chosen[best],
        "word": tokenizer.convert_tokens_to_string([piece.word for piece in word]),
        "start": word[0].start,
        "end": word[-1].end,
    }


def _tag(label: str) -> tuple[str, str]:
    """("B" or "I", the entity type): B-X and I-X by their prefix; any other label continues (I)."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _runs(tagged: list[dict]) -> list[list[dict]]:
    """Neighbours of one entity type, each run started by a B- tag or a change of type."""
    runs: list[list[dict]] = []
    for entity in tagged:
        bi, kind = _tag(entity["entity"])
        if runs and bi != "B" and kind == _tag(runs[-1][-1]["entity"])[1]:
            runs[-1].append(entity)
        else:
            runs.append([entity])
    return runs


def _group(run: list[dict], tokenizer) -> dict:
    return {
        # The pipeline names a group by its first label after the first "-" (so "B-PER" is "PER").
        "entity_group": run[0]["entity"].split("-", 1)[-1],
        "score": sum(entity["score"] for entity in run) / len(run),
        "word": tokenizer.convert_tokens_to_string([entity["word"] for entity in run]),
        "start": run[0]["start"],
        "end": run[-1]["end"],
    }
