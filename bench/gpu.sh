#!/usr/bin/env bash
# On a CUDA machine: the CUDA-marked tests, then the engine and serving benchmarks in float16 and
# bfloat16, and one table of the figures.
#
#     bench/gpu.sh                 # SECONDS_PER_LEVEL=20 REPS=9 MODELS="minilm bert-base" by default
#
# Every figure comes from this one run; JSON goes to bench/out/gpu/. Exits non-zero if the tests fail
# or no GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/out/gpu
MODELS=${MODELS:-"minilm bert-base"}
REPS=${REPS:-9}
SECONDS_PER_LEVEL=${SECONDS_PER_LEVEL:-20}
mkdir -p "$OUT"

python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible")'
python -c 'import torch; print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)'

echo "== CUDA-marked tests"
python -m pytest -q -m cuda

for dtype in float16 bfloat16; do
    for model in $MODELS; do
        echo "== engine $model $dtype"
        python bench/engine.py --device cuda --dtype "$dtype" --model "$model" --reps "$REPS" \
            --json "$OUT/engine-$model-$dtype.json"
    done
    echo "== serving $dtype"
    python bench/serving.py --device cuda --dtype "$dtype" --seconds "$SECONDS_PER_LEVEL" --warmup 4 \
        --json "$OUT/serving-$dtype.json"
done

python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("\n| what | dtype | bare | engine, no adapter | engine K=1 | engine K=64 | PEFT mixed K=64 | engine/PEFT mixed |")
print("|---|---|---|---|---|---|---|---|")
for path in sorted(out.glob("engine-*.json")):
    r = json.loads(path.read_text())
    s = r["seq_per_s"]
    mixed = s.get("c: peft mixed K=64")
    cells = [s.get("a: bare model"), s.get("engine, no adapter"), s.get("b: engine K=1"), s.get("b: engine K=64"), mixed]
    ratio = s["b: engine K=64"] / mixed if mixed else None
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    print(f"| engine {r['model']} (seq/s) | {r['dtype']} | " + " | ".join(map(fmt, cells)) + f" | {fmt(ratio)} |")
print("\n| serving | dtype | clients | req/s | p50 ms | p99 ms | mean batch | vs engine-only |")
print("|---|---|---|---|---|---|---|---|")
for path in sorted(out.glob("serving-*.json")):
    r = json.loads(path.read_text())
    for level in r["levels"]:
        print(
            f"| 64 adapters | {r['dtype']} | {level['clients']} | {level['requests_per_s']:.1f} | "
            f"{level['p50_ms']:.0f} | {level['p99_ms']:.0f} | {level['mean_batch_rows']:.1f} | "
            f"{level['vs_engine_only']:.2f}x |"
        )
EOF
