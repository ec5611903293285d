"""What each task's rows become in an answer: label scores and embeddings.

The engine process returns per row what its adapter's task computes (`loraplex.engine.core.Engine.classify`);
the workers turn those float32 arrays into response fields with numpy. Entity aggregation is in
`loraplex.http.entities`, answer spans in `loraplex.http.qa`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from loraplex.adapters.errors import ConflictError

POOLINGS = ("mean", "cls", "max")


def check_finite(values: np.ndarray, handle) -> None:
    if not np.isfinite(values).all():
        # Finite weights can still overflow float32; the adapter, not the request, has to change: a fault of
        # the stored adapter is a 409, like every other one (a 422 would say the request is wrong).
        raise ConflictError(
            f"Adapter {handle.adapter_id!r} (version {handle.version}) gives non-finite scores for these "
            "inputs: its weights overflow float32. Upload a corrected adapter."
        )


def softmax(values: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = np.exp(values - values.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-values))


def label_scores(logits: np.ndarray, problem_type: str | None, raw: bool) -> np.ndarray:
    """`logits [..., labels]` as the adapter's problem type reads them: softmax over the labels
    (single-label), a sigmoid per label (multi-label), or the logits themselves (regression, or `raw`)."""
    if raw or problem_type == "regression":
        return logits
    if problem_type == "multi_label_classification":
        return sigmoid(logits)
    return softmax(logits)


def classification(
    logits: np.ndarray,  # [inputs, labels]
    handle,
    *,
    raw_scores: bool = False,
    top_k: int | None = None,
    threshold: float = 0.5,
) -> list[dict]:
    """One /classify result per row: arg-max `label`/`score`, every label's `scores`; multi-label rows
    also list the `labels` whose score is at least `threshold`; `top_k` adds the k best, best first."""
    check_finite(logits, handle)
    problem = handle.problem_type
    values = label_scores(logits, problem, raw_scores)
    probabilities = sigmoid(logits).tolist() if raw_scores else None
    labels = handle.labels
    results = []
    for n, row in enumerate(values.tolist()):
        best = max(range(len(row)), key=row.__getitem__)
        result = {"label": labels[best], "score": row[best], "scores": dict(zip(labels, row, strict=True))}
        if problem == "multi_label_classification":
            chances = probabilities[n] if raw_scores else row
            result["labels"] = [name for name, p in zip(labels, chances, strict=True) if p >= threshold]
        if top_k is not None:
            ranked = sorted(range(len(row)), key=lambda j: -row[j])[:top_k]
            result["top"] = [{"label": labels[j], "score": row[j]} for j in ranked]
        results.append(result)
    return results


def pool(hidden: np.ndarray, pooling: str, normalize: bool) -> np.ndarray:
    """`hidden [tokens, H]` of one row's real tokens -> `[H]`: their mean, the first token's, or the
    maximum per feature (sentence-transformers' pooling modes); `normalize`: to unit length."""
    if pooling == "cls":
        vector = hidden[0]
    elif pooling == "max":
        vector = hidden.max(axis=0)
    else:
        vector = hidden.mean(axis=0, dtype=np.float32)
    if normalize:
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)  # as torch's F.normalize
    return vector


def sentence_pooling(model_dir: str) -> tuple[str, bool]:
    """The pooling mode and normalisation that a sentence-transformers checkpoint declares
    (`modules.json`, its Pooling module's config, a Normalize module); ("mean", False) without them."""
    root = Path(model_dir)
    try:
        modules = json.loads((root / "modules.json").read_text())
        pooling = next(m for m in modules if m.get("type", "").endswith(".Pooling"))
        config = json.loads((root / pooling.get("path", "") / "config.json").read_text())
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        return "mean", False
    mode = next((name for name in POOLINGS if config.get(f"pooling_mode_{_MODE_KEYS[name]}")), "mean")
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    return mode, normalize


_MODE_KEYS = {"mean": "mean_tokens", "cls": "cls_token", "max": "max_tokens"}
