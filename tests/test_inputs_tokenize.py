"""Rows from the fast path (the tokenizer's own Rust tokenizer, configured once) equal Hugging Face's call of
the same tokenizer (the path a slow tokenizer takes): ids, where token type 1 starts, what was cut, and the
refusal of a long input, for WordPiece, byte-level BPE and Unigram tokenizers, texts and pairs, either
side."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from loraplex.adapters.errors import InvalidInputError
from loraplex.http import inputs
from tests.peft_factory import tokenizer as minilm_tokenizer

CORPUS = [
    "the service was quick and friendly",
    "I waited an hour and nobody answered the phone",
    "great phone, bad battery; would buy again?",
    "Ünïcödé wörds and emoji 😀 are text too",
] * 20
TEXTS = [
    "the service was quick and friendly",
    "",
    "   ",
    "  [SEP] [CLS] <s> </s> héllo 😀 wörld  ",
    " ".join(f"word{i}" for i in range(300)),  # over the limit below
]
PAIRS = [
    ("a premise", "a hypothesis"),
    ("", "only the second"),
    ("short", "a long second text " * 60),
    ("a long first text " * 60, "short"),
    ("both long " * 50, "both long too " * 50),
]
MAX_LENGTH = 64


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """RoBERTa's shape: byte-level BPE, `<s> A </s></s> B </s>`, no token types."""
    rust = Tokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    rust.train_from_iterator(CORPUS, trainer)
    rust.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(
        tokenizer_object=rust, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )  # fmt: skip


def unigram_tokenizer() -> PreTrainedTokenizerFast:
    """DeBERTa-v2's shape: a Unigram model over Metaspace pieces, `[CLS] A [SEP] B [SEP]` with types."""
    rust = Tokenizer(models.Unigram())
    rust.pre_tokenizer = pre_tokenizers.Metaspace()
    rust.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]"], unk_token="[UNK]"
    )
    rust.train_from_iterator(CORPUS, trainer)
    cls, sep = rust.token_to_id("[CLS]"), rust.token_to_id("[SEP]")
    rust.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=rust, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )  # fmt: skip


TOKENIZERS = {"wordpiece": minilm_tokenizer, "byte-level-bpe": bpe_tokenizer, "unigram": unigram_tokenizer}


def rows_as_hugging_face_calls(tokenizer, items, **kwargs):
    """`inputs.encode` with the fast path switched off for this tokenizer: the Hugging Face call."""
    inputs._rust[tokenizer] = None
    try:
        return inputs.encode(tokenizer, MAX_LENGTH, items, **kwargs)
    finally:
        del inputs._rust[tokenizer]


def described(rows):
    return [(list(row), row.type_start, row.truncated) for row in rows]


@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.parametrize("direction", ["right", "left"])
def test_the_fast_path_gives_the_rows_of_hugging_faces_call(kind, direction):
    tokenizer = TOKENIZERS[kind]()
    assert inputs._rust_tokenizers(tokenizer) is not None  # the fast path is the one under test
    items = TEXTS + PAIRS + [TEXTS[0], PAIRS[0]]  # texts and pairs interleaved: rows keep input order
    ours = inputs.encode(tokenizer, MAX_LENGTH, items, direction=direction)
    theirs = rows_as_hugging_face_calls(tokenizer, items, direction=direction)
    assert described(ours) == described(theirs)
    cut = [row.truncated for row in ours]
    assert cut == [False] * 4 + [True] + [False, False, True, True, True] + [False, False]
    assert all(len(row) <= MAX_LENGTH for row in ours)


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_a_long_input_is_refused_alike_without_truncation(kind):
    tokenizer = TOKENIZERS[kind]()
    items = [TEXTS[0], PAIRS[2]]
    with pytest.raises(InvalidInputError) as ours:
        inputs.encode(tokenizer, MAX_LENGTH, items, truncate=False)
    with pytest.raises(InvalidInputError) as theirs:
        rows_as_hugging_face_calls(tokenizer, items, truncate=False)
    assert ours.value.message == theirs.value.message
    assert ours.value.message.startswith("Input 1 has ")


def test_a_tokenizer_class_that_changes_the_call_is_called_as_it_is():
    class Shouting(PreTrainedTokenizerFast):
        def _encode_plus(self, text, text_pair=None, **kwargs):
            upper = [t.upper() for t in text] if isinstance(text, list) else text.upper()
            return super()._encode_plus(upper, text_pair, **kwargs)

    plain = bpe_tokenizer()
    shouting = Shouting(tokenizer_object=plain._tokenizer, bos_token="<s>", eos_token="</s>")
    shouting.model_input_names = plain.model_input_names
    assert inputs._rust_tokenizers(shouting) is None and inputs._rust_tokenizers(plain) is not None
    ours = inputs.encode(shouting, MAX_LENGTH, ["great phone"])
    assert list(ours[0]) == shouting(["great phone"])["input_ids"][0]
    assert list(ours[0]) != list(inputs.encode(plain, MAX_LENGTH, ["great phone"])[0])


def test_a_request_leaves_the_tokenizers_own_settings_alone():
    tokenizer = minilm_tokenizer()
    before = (tokenizer._tokenizer.truncation, tokenizer._tokenizer.padding)
    inputs.encode(tokenizer, MAX_LENGTH, TEXTS + PAIRS, direction="left")
    assert (tokenizer._tokenizer.truncation, tokenizer._tokenizer.padding) == before
