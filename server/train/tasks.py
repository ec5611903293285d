"""What each `loraplex train --task` trains: the PEFT task type, token features, loss, and validation metrics
against a trivial baseline.

    task         task_type     problem_type                 loss              weak when no better than
    seq-cls      SEQ_CLS       (single label)               cross-entropy     the most common label
    pairs        SEQ_CLS       (single label, token types)  cross-entropy     the most common label
    multi-label  SEQ_CLS       multi_label_classification   BCE per label     the most common label set
    regression   SEQ_CLS       regression                   MSE (z-scored)    the training mean
    rerank       SEQ_CLS       (one output, token types)    BCE on the logit  the training mean relevance
    embed        FEATURE_EXTR. -                            in-batch CE       the base model's embeddings
    tokens       TOKEN_CLS     -                            cross-entropy     the most common tag
    qa           QUESTION_ANS  -                            start/end CE      the context's first words

Tokens are labelled at the first subword of each word (-100, ignored, elsewhere); qa contexts longer than
a window are cut into windows overlapping by `doc_stride` tokens, and an answer outside a window points at
its first token, as Hugging Face's examples do. embed pools each text as the base model's
sentence-transformers config says (as /embed does) and scores every text of a batch against every second
text of it: the row's own second text is the answer, the others are its negatives (cosine similarity
times EMBED_SCALE, cross-entropy).
"""

from __future__ import annotations

import bisect
import math
import re
import string
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplex.adapters.peft import FEATURE_EXTRACTION, QUESTION_ANS, SEQ_CLS, TOKEN_CLS
from loraplex.train.data import Examples, TrainingDataError

TASK_TYPES = {
    "seq-cls": SEQ_CLS,
    "pairs": SEQ_CLS,
    "multi-label": SEQ_CLS,
    "regression": SEQ_CLS,
    "rerank": SEQ_CLS,
    "embed": FEATURE_EXTRACTION,
    "tokens": TOKEN_CLS,
    "qa": QUESTION_ANS,
}
PROBLEM_TYPES = {"multi-label": "multi_label_classification", "regression": "regression"}
# task -> (the validation figure the progress bar shows, its name there)
HEADLINES = {
    "seq-cls": ("accuracy", "val_acc"),
    "pairs": ("accuracy", "val_acc"),
    "multi-label": ("subset_accuracy", "val_acc"),
    "regression": ("r2", "val_r2"),
    "rerank": ("auc", "val_auc"),
    "embed": ("mrr", "val_mrr"),
    "tokens": ("accuracy", "val_acc"),
    "qa": ("f1", "val_f1"),
}
# task -> the key of its trivial baseline's figures in the validation metrics
BASELINES = {
    "seq-cls": "majority_baseline",
    "pairs": "majority_baseline",
    "multi-label": "majority_baseline",
    "regression": "mean_baseline",
    "rerank": "mean_baseline",
    "embed": "base_model_baseline",
    "tokens": "majority_baseline",
    "qa": "first_words_baseline",
}
IGNORE = -100  # a token the loss skips
ANSWER_CANDIDATES = 20  # best start and end tokens tried per window
EMBED_SCALE = 20.0  # embed: cosine similarities are multiplied by this before the softmax over a batch


@dataclass
class Features:
    """Model inputs made from Examples; one feature per row, or per window of a qa context.

    ids      per feature: token ids, special tokens included
    types    per feature: token type ids, where the tokenizer makes them (pairs, qa); else None
    targets  per feature: a label id; a 0/1 list per label; a z-scored float (regression); a relevance
             (rerank); the second text's token ids (embed); a label id or IGNORE per token; (start token,
             end token)
    example  per feature: the row of Examples it comes from
    spans    tokens: per feature the (token, word) of each word's first subword; qa: per feature each
             token's (start, end) characters in the context, None outside it
    """

    ids: list[list[int]]
    types: list[list[int]] | None
    targets: list
    example: list[int]
    spans: list[list] | None = None


def head_kwargs(task: str, labels: list[str]) -> dict:
    """from_pretrained arguments of the task's Hugging Face model."""
    if task == "embed":
        return {}
    kwargs = {"num_labels": len(labels)}
    if task != "qa":
        kwargs |= {"id2label": dict(enumerate(labels)), "label2id": {lab: i for i, lab in enumerate(labels)}}
    if task in PROBLEM_TYPES:
        kwargs["problem_type"] = PROBLEM_TYPES[task]
    return kwargs


def featurize(
    task: str,
    tokenizer,
    examples: Examples,
    labels: list[str],
    max_length: int,
    doc_stride: int,
    scale: tuple[float, float] = (0.0, 1.0),
) -> Features:
    """Examples as Features; `scale` (mean, std) z-scores regression targets."""
    index = {lab: i for i, lab in enumerate(labels)}
    if task == "tokens":
        return _token_features(tokenizer, examples, index, max_length)
    if task == "qa":
        return _qa_features(tokenizer, examples, max_length, doc_stride)
    if task == "embed":
        texts = tokenizer(examples.texts, truncation=True, max_length=max_length)["input_ids"]
        seconds = tokenizer(examples.pairs, truncation=True, max_length=max_length)["input_ids"]
        return Features(texts, None, seconds, list(range(len(examples.texts))))
    pairs = examples.pairs
    types = "token_type_ids" in tokenizer.model_input_names and pairs is not None
    encoded = tokenizer(
        examples.texts, pairs, truncation=True, max_length=max_length, return_token_type_ids=types
    )
    if task == "multi-label":
        targets = [[float(lab in row) for lab in labels] for row in examples.labels]
    elif task == "regression":
        mean, std = scale
        targets = [(y - mean) / std for y in examples.labels]
    elif task == "rerank":
        targets = list(examples.labels)
    else:
        targets = [index[lab] for lab in examples.labels]
    return Features(
        encoded["input_ids"],
        encoded["token_type_ids"] if types else None,
        targets,
        list(range(len(examples.texts))),
    )


def _token_features(tokenizer, examples: Examples, index: dict[str, int], max_length: int) -> Features:
    encoded = tokenizer(examples.texts, is_split_into_words=True, truncation=True, max_length=max_length)
    targets, spans = [], []
    for row, tags in enumerate(examples.labels):
        word_ids = encoded.word_ids(row)
        target, firsts = [IGNORE] * len(word_ids), []
        for position, word in enumerate(word_ids):
            if word is not None and (position == 0 or word_ids[position - 1] != word):
                target[position] = index[tags[word]]
                firsts.append((position, word))
        targets.append(target)
        spans.append(firsts)
    return Features(encoded["input_ids"], None, targets, list(range(len(examples.texts))), spans)


def _qa_features(tokenizer, examples: Examples, max_length: int, doc_stride: int) -> Features:
    special = tokenizer.num_special_tokens_to_add(pair=True)
    question_lengths = tokenizer(examples.texts, add_special_tokens=False)["input_ids"]
    for where, ids in zip(examples.where or [], question_lengths, strict=False):
        if max_length - special - len(ids) <= doc_stride:
            raise TrainingDataError(
                f"{where}: the question has {len(ids)} tokens, which with --max-length {max_length} and "
                f"--doc-stride {doc_stride} leaves no room for the context; pass a larger --max-length or a "
                "smaller --doc-stride, or shorten the question."
            )
    types = "token_type_ids" in tokenizer.model_input_names
    encoded = tokenizer(
        examples.texts,
        examples.pairs,
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_token_type_ids=types,
    )
    targets, spans = [], []
    for feature, row in enumerate(encoded["overflow_to_sample_mapping"]):
        sequence = encoded.sequence_ids(feature)
        offsets = [
            tuple(span) if sequence[t] == 1 else None
            for t, span in enumerate(encoded["offset_mapping"][feature])
        ]
        spans.append(offsets)
        answers = examples.labels[row]
        target = (0, 0)  # no answer in this window: the first token, as Hugging Face trains SQuAD 2.0
        if answers:
            start_char, text = answers[0]
            end_char = start_char + len(text)
            inside = [t for t, span in enumerate(offsets) if span is not None]
            if offsets[inside[0]][0] <= start_char and offsets[inside[-1]][1] >= end_char:
                start = next(t for t in inside if offsets[t][1] > start_char)
                end = next(t for t in reversed(inside) if offsets[t][0] < end_char)
                target = (start, end)
        targets.append(target)
    return Features(
        encoded["input_ids"],
        encoded["token_type_ids"] if types else None,
        targets,
        list(encoded["overflow_to_sample_mapping"]),
        spans,
    )


# ---------------------------------------------------------------------------------------------- training


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """`hidden [B, T, H]`, `mask [B, T]` -> `[B, H]`: the mean of each row's real tokens, its first
    token's, or their maximum per feature, as /embed pools."""
    if pooling == "cls":
        return hidden[:, 0]
    real = mask[..., None].to(hidden.dtype)  # [B, T, 1]
    if pooling == "max":
        return hidden.masked_fill(real == 0, torch.finfo(hidden.dtype).min).max(1).values
    return (hidden * real).sum(1) / real.sum(1).clamp(min=1)


def in_batch_scores(
    texts: torch.Tensor, seconds: torch.Tensor, twins: torch.Tensor | None = None
) -> torch.Tensor:
    """`[B, H]` and `[B, H]` -> `[B, B]`: cosine similarity of each text with every second text, times
    EMBED_SCALE; row i's answer is column i. `twins [B, B]` marks other rows' second texts identical to
    row i's: they are not negatives, so they are left out of its softmax."""
    scores = F.normalize(texts, dim=-1) @ F.normalize(seconds, dim=-1).T * EMBED_SCALE
    return scores if twins is None else scores.masked_fill(twins, float("-inf"))


def twin_mask(seconds: list[list[int]]) -> torch.Tensor:
    """`[B, B]`: True where row j's second text is row i's, for j != i."""
    same = [[a == b and i != j for j, b in enumerate(seconds)] for i, a in enumerate(seconds)]
    return torch.tensor(same, dtype=torch.bool)


def logits_of(task: str, output) -> torch.Tensor:
    """The model's output as the server computes it: `[B, labels]`, or `[B, T, labels]` for tokens and
    qa (qa: start and end logits in the last dimension)."""
    if task == "qa":
        return torch.stack([output.start_logits, output.end_logits], dim=-1)
    return output.logits


def collate_targets(task: str, targets: list, width: int) -> torch.Tensor:
    """A batch's targets as the loss takes them (token targets padded to `width` with IGNORE)."""
    if task == "tokens":
        return torch.tensor([t + [IGNORE] * (width - len(t)) for t in targets])  # [B, T]
    if task in ("multi-label", "regression", "rerank"):
        return torch.tensor(targets, dtype=torch.float32)  # [B, labels] or [B]
    if task == "embed":
        return torch.arange(len(targets))  # [B] the column of each row's own second text
    return torch.tensor(targets)  # [B] label ids, or [B, 2] start and end tokens


def loss_of(task: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The task's training loss; `logits` as `logits_of` gives them, in float32."""
    if task == "multi-label":
        return F.binary_cross_entropy_with_logits(logits, targets)
    if task == "regression":
        return F.mse_loss(logits[:, 0], targets)
    if task == "rerank":
        return F.binary_cross_entropy_with_logits(logits[:, 0], targets)
    if task == "tokens":
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    if task == "qa":
        return (
            F.cross_entropy(logits[..., 0], targets[:, 0]) + F.cross_entropy(logits[..., 1], targets[:, 1])
        ) / 2
    return F.cross_entropy(logits, targets)


def chance_loss(
    task: str, features: Features, labels: list[str], batch_size: int = 1
) -> tuple[float, str, str]:
    """(the training loss of a guess that learned nothing, its formula, what that guess is)."""
    if task == "embed":
        return math.log(batch_size), f"ln({batch_size})", "a uniform guess among a batch's second texts"
    if task == "rerank":
        mean = sum(features.targets) / len(features.targets)
        entropy = -sum(
            y * math.log(mean) + (1 - y) * math.log(1 - mean) if 0 < mean < 1 else 0.0
            for y in features.targets
        ) / len(features.targets)
        return entropy, "the relevances' cross-entropy with their mean", "always answering the mean relevance"
    if task == "regression":
        return 1.0, "1", "always answering the mean (the targets are z-scored)"
    if task == "multi-label":
        k = len(labels)
        rates = [sum(t[j] for t in features.targets) / len(features.targets) for j in range(k)]
        entropy = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else 0.0 for p in rates]
        return (
            sum(entropy) / k,
            "the labels' mean binary entropy",
            "answering each label's training frequency",
        )
    if task == "qa":
        width = sum(map(len, features.ids)) / len(features.ids)
        return math.log(width), f"ln({width:.0f})", "a uniform guess over a window's tokens"
    return math.log(len(labels)), f"ln({len(labels)})", "a uniform guess"


# -------------------------------------------------------------------------------------------- evaluation


def evaluate(
    task: str,
    examples: Examples,
    features: Features,
    outputs: list[torch.Tensor],
    labels: list[str],
    train: Examples,
    max_answer_length: int = 30,
    base_outputs: list[torch.Tensor] | None = None,
) -> dict:
    """Validation metrics of `outputs` (one per feature, as `logits_of` gives them, a row's own tokens
    only; embed: `[2, H]`, the text's vector and its second text's) and the figures of the task's trivial
    baseline under BASELINES[task] (embed: of `base_outputs`, the base model's vectors, when given)."""
    if task == "embed":
        metrics = retrieval_metrics(outputs)
        if base_outputs is not None:
            metrics[BASELINES[task]] = retrieval_metrics(base_outputs)
        return metrics
    if task == "rerank":
        mean = sum(train.labels) / len(train.labels)
        scores = [torch.sigmoid(out[0]).item() for out in outputs]
        metrics = relevance_metrics(examples.labels, scores)
        metrics[BASELINES[task]] = {"value": mean, **relevance_metrics(examples.labels, [mean] * len(scores))}
        return metrics
    if task == "multi-label":
        pred = [[float(v > 0) for v in out.tolist()] for out in outputs]
        gold = [[float(lab in row) for lab in labels] for row in examples.labels]
        metrics = multi_label_metrics(gold, pred, labels)
        common = Counter(map(frozenset, train.labels)).most_common(1)[0][0]
        always = [[float(lab in common) for lab in labels]] * len(gold)
        base = multi_label_metrics(gold, always, labels)
        metrics[BASELINES[task]] = {
            "labels": [lab for lab in labels if lab in common],
            "subset_accuracy": base["subset_accuracy"],
            "macro_f1": base["macro_f1"],
        }
        return metrics
    if task == "regression":
        mean = sum(train.labels) / len(train.labels)
        metrics = regression_metrics(examples.labels, [out[0].item() for out in outputs])
        metrics[BASELINES[task]] = {
            "value": mean,
            "mse": regression_metrics(examples.labels, [mean] * len(outputs))["mse"],
        }
        return metrics
    if task == "qa":
        return qa_metrics(examples, features, outputs, train, max_answer_length)
    if task == "tokens":
        gold, pred = [], []
        index = {lab: i for i, lab in enumerate(labels)}
        for row, out, firsts in zip(features.example, outputs, features.spans, strict=True):
            for position, word in firsts:
                gold.append(index[examples.labels[row][word]])
                pred.append(int(out[position].argmax()))
        metrics = classification_metrics(gold, pred, labels)
        metrics["words_cut"] = sum(map(len, examples.labels)) - len(gold)
        counts = Counter(tag for row in train.labels for tag in row)
    else:
        gold = [labels.index(lab) for lab in examples.labels]
        metrics = classification_metrics(gold, [int(out.argmax()) for out in outputs], labels)
        counts = Counter(train.labels)
    most = index_of_most(counts, labels)
    metrics[BASELINES[task]] = {
        "label": labels[most],
        "accuracy": gold.count(most) / len(gold) if gold else 0.0,
    }
    return metrics


def index_of_most(counts: Counter, labels: list[str]) -> int:
    """The head index of the most common label (the first in head order on a tie)."""
    return max(range(len(labels)), key=lambda i: (counts[labels[i]], -i))


def classification_metrics(gold: list[int], pred: list[int], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-label precision/recall/F1/support and the confusion matrix
    (`confusion[g][p]` counts rows of gold label g predicted as p)."""
    k = len(labels)
    confusion = [[0] * k for _ in range(k)]
    for g, p in zip(gold, pred, strict=True):
        confusion[g][p] += 1
    per_label, f1s = {}, []
    for i, name in enumerate(labels):
        tp = confusion[i][i]
        predicted = sum(confusion[g][i] for g in range(k))
        support = sum(confusion[i])
        per_label[name] = _prf(tp, predicted, support)
        f1s.append(per_label[name]["f1"])
    total = len(gold)
    return {
        "accuracy": sum(confusion[i][i] for i in range(k)) / total if total else 0.0,
        "macro_f1": sum(f1s) / k,
        "examples": total,
        "per_label": per_label,
        "confusion": confusion,
    }


def multi_label_metrics(gold: list[list[float]], pred: list[list[float]], labels: list[str]) -> dict:
    """Subset accuracy (every label of the row right), macro- and micro-F1 and per-label figures."""
    per_label, totals = {}, [0, 0, 0]
    for j, name in enumerate(labels):
        tp = sum(g[j] and p[j] for g, p in zip(gold, pred, strict=True))
        predicted, support = sum(p[j] for p in pred), sum(g[j] for g in gold)
        per_label[name] = _prf(int(tp), int(predicted), int(support))
        totals = [totals[0] + tp, totals[1] + predicted, totals[2] + support]
    return {
        "subset_accuracy": sum(g == p for g, p in zip(gold, pred, strict=True)) / len(gold),
        "macro_f1": sum(m["f1"] for m in per_label.values()) / len(labels),
        "micro_f1": _prf(*map(int, totals))["f1"],
        "examples": len(gold),
        "per_label": per_label,
    }


def _prf(tp: int, predicted: int, support: int) -> dict:
    precision = tp / predicted if predicted else 0.0
    recall = tp / support if support else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def regression_metrics(gold: list[float], pred: list[float]) -> dict:
    """Mean squared and absolute error, R^2 (against the validation rows' own mean) and Pearson's r."""
    n = len(gold)
    mean = sum(gold) / n
    sse = sum((g - p) ** 2 for g, p in zip(gold, pred, strict=True))
    sst = sum((g - mean) ** 2 for g in gold)
    pm = sum(pred) / n
    cov = sum((g - mean) * (p - pm) for g, p in zip(gold, pred, strict=True))
    spread = math.sqrt(sst * sum((p - pm) ** 2 for p in pred))
    return {
        "mse": sse / n,
        "mae": sum(abs(g - p) for g, p in zip(gold, pred, strict=True)) / n,
        "r2": 1 - sse / sst if sst else None,
        "pearson": cov / spread if spread else None,
        "examples": n,
    }


def relevance_metrics(gold: list[float], scores: list[float]) -> dict:
    """A reranker's figures: ROC AUC (pairs of relevance >= 0.5 against the others; None when the rows
    are all of one side), accuracy at 0.5 and the mean squared error of the scores (Brier)."""
    relevant = [s for g, s in zip(gold, scores, strict=True) if g >= 0.5]
    others = [s for g, s in zip(gold, scores, strict=True) if g < 0.5]
    auc = None
    if relevant and others:
        ordered = sorted(others)
        wins = 0.0
        for s in relevant:  # other scores below s count 1, equal ones 1/2
            below, upto = bisect.bisect_left(ordered, s), bisect.bisect_right(ordered, s)
            wins += below + (upto - below) / 2
        auc = wins / (len(relevant) * len(others))
    right = sum((s >= 0.5) == (g >= 0.5) for g, s in zip(gold, scores, strict=True))
    n = len(gold)
    return {
        "auc": auc,
        "accuracy": right / n,
        "mse": sum((g - s) ** 2 for g, s in zip(gold, scores, strict=True)) / n,
        "examples": n,
    }


def retrieval_metrics(outputs: list[torch.Tensor]) -> dict:
    """Each row's text searches all rows' second texts by cosine similarity: the share of rows whose own
    second text comes first (top-1), the mean reciprocal rank of it (MRR), and a random order's MRR."""
    texts = F.normalize(torch.stack([out[0] for out in outputs]).float(), dim=-1)  # [N, H]
    seconds = F.normalize(torch.stack([out[1] for out in outputs]).float(), dim=-1)  # [N, H]
    similarity = texts @ seconds.T  # [N, N]
    own = similarity.diagonal()[:, None]  # [N, 1]
    ranks = (similarity > own).sum(1) + 1  # [N] 1 when the own second text is the nearest
    n = len(outputs)
    return {
        "top1": float((ranks == 1).float().mean()),
        "mrr": float((1.0 / ranks.float()).mean()),
        "random_mrr": sum(1 / k for k in range(1, n + 1)) / n,
        "examples": n,
    }


def qa_metrics(
    examples: Examples,
    features: Features,
    outputs: list[torch.Tensor],
    train: Examples,
    max_answer_length: int,
) -> dict:
    """SQuAD's exact match and token F1 (best over each question's answers) of the best span over its
    windows; SQuAD 2.0 data (some training question unanswerable) may also answer nothing."""
    null_allowed = any(not answers for answers in train.labels)
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for row, out, offsets in zip(features.example, outputs, features.spans, strict=True):
        start, end = out[:, 0], out[:, 1]  # [T]
        null[row] = min(null.get(row, math.inf), float(start[0] + end[0]))
        starts = start.topk(min(ANSWER_CANDIDATES, len(start))).indices.tolist()
        ends = end.topk(min(ANSWER_CANDIDATES, len(end))).indices.tolist()
        for s in starts:
            for e in ends:
                if offsets[s] is None or offsets[e] is None or not 0 <= e - s < max_answer_length:
                    continue
                score = float(start[s] + end[e])
                if score > best.get(row, (-math.inf, ""))[0]:
                    best[row] = (score, examples.pairs[row][offsets[s][0] : offsets[e][1]])
    predictions = []
    for row in range(len(examples.texts)):
        score, text = best.get(row, (-math.inf, ""))
        predictions.append("" if null_allowed and null.get(row, -math.inf) > score else text)
    golds = [[text for _, text in answers] or [""] for answers in examples.labels]
    metrics = _squad(golds, predictions)
    lengths = sorted(len(text.split()) for answers in train.labels for _, text in answers[:1]) or [1]
    words = lengths[len(lengths) // 2]
    firsts = [" ".join(context.split()[:words]) for context in examples.pairs]
    metrics[BASELINES["qa"]] = {"answer": f"the context's first {words} word(s)", **_squad(golds, firsts)}
    return metrics


def _squad(golds: list[list[str]], predictions: list[str]) -> dict:
    em = [max(_normalize(p) == _normalize(g) for g in gs) for gs, p in zip(golds, predictions, strict=True)]
    f1 = [max(_token_f1(p, g) for g in gs) for gs, p in zip(golds, predictions, strict=True)]
    return {"exact_match": sum(em) / len(em), "f1": sum(f1) / len(f1), "examples": len(em)}


def _normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _token_f1(prediction: str, gold: str) -> float:
    pred, want = _normalize(prediction).split(), _normalize(gold).split()
    if not pred or not want:
        return float(pred == want)
    common = sum((Counter(pred) & Counter(want)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(want)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------- weak results


def weak_reasons(task: str, validation: dict) -> list[str]:
    """Why the validation metrics are no better than the task's trivial baseline; empty when they are."""
    base = validation.get(BASELINES[task])
    rows = validation["examples"]
    if task == "embed":
        if base is None or validation["mrr"] > base["mrr"]:
            return []
        return [
            f"held-out MRR {validation['mrr']:.4f} (top-1 {validation['top1']:.4f}) is no better than the "
            f"base model's own embeddings ({base['mrr']:.4f}, top-1 {base['top1']:.4f}) over the {rows} "
            "validation pairs"
        ]
    if task == "rerank":
        reasons = []
        if validation["auc"] is not None and validation["auc"] <= 0.5:
            reasons.append(
                f"held-out AUC {validation['auc']:.4f} is no better than a constant score (0.5): relevant "
                "pairs do not score above the others"
            )
        if validation["mse"] >= base["mse"]:
            reasons.append(
                f"held-out mean squared error of the scores {validation['mse']:.4g} is no better than "
                f"always answering the training mean relevance {base['value']:.4g} ({base['mse']:.4g} over "
                f"the {rows} validation pairs)"
            )
        return reasons
    if task == "multi-label":
        always = f"always answering the most common label set {base['labels']}"
        return [
            f"held-out {name} {validation[key]:.4f} is no better than {always} ({base[key]:.4f})"
            for key, name in (("subset_accuracy", "subset accuracy"), ("macro_f1", "macro-F1"))
            if validation[key] <= base[key]
        ]
    if task == "regression":
        if validation["mse"] < base["mse"]:
            return []
        return [
            f"held-out mean squared error {validation['mse']:.4g} is no better than always answering the "
            f"training mean {base['value']:.4g} ({base['mse']:.4g} over the {rows} validation rows; R^2 <= 0)"
        ]
    if task == "qa":
        return [
            f"held-out {name} {validation[key]:.4f} is no better than answering {base['answer']} "
            f"({base[key]:.4f})"
            for key, name in (("exact_match", "exact match"), ("f1", "token F1"))
            if validation[key] <= base[key]
        ]
    if validation["accuracy"] > base["accuracy"]:
        return []
    what = (
        f"tagging every word {base['label']!r}" if task == "tokens" else f"always answering {base['label']!r}"
    )
    units = "words" if task == "tokens" else "validation rows"
    return [
        f"held-out accuracy {validation['accuracy']:.4f} is no better than {what} "
        f"({base['accuracy']:.4f} of the {rows} {units})"
    ]
