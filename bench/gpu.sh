#!/usr/bin/env bash
# On one CUDA GPU, in one run: the CUDA-marked tests, the serving benchmark (64 adapters, 256 and 64
# closed-loop clients) and the engine benchmarks (MiniLM and the bert-base shape), all in bfloat16, then
# one table of the figures.
#
#     bench/gpu.sh                    # SECONDS_PER_LEVEL=10 REPS=5; the server's default --workers
#     WORKERS=4 bench/gpu.sh          # loraplex serve --workers 4; WORKERS="2 8": one serving run each
#     DTYPES="float16 bfloat16" bench/gpu.sh   # the engine benchmarks in float16 too
#
# Expected time on one H200 with 16 cores: about 4-5 minutes (tests about 1, serving about 1.5, the two
# engine runs about 2), each more WORKERS value about 1.5 more, float16 about 2 more. Every step runs
# under a time limit and the whole run stops starting steps after LIMIT_S (default 420 s), so that it ends
# within 8 minutes even when a step hangs; a step it cuts or skips is reported as failed.
#
# Every figure comes from this one run; the output of each step and the JSON go to bench/out/gpu/. A failed
# benchmark does not stop the run or hide the tests' result, which is printed again at the end. Exit
# status: 1 if the tests failed or no GPU is visible, else 2 if a benchmark failed, else 0.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/out/gpu
MODELS=${MODELS:-"minilm bert-base"}
DTYPES=${DTYPES:-bfloat16}
REPS=${REPS:-5}
SECONDS_PER_LEVEL=${SECONDS_PER_LEVEL:-10}
CLIENTS=${CLIENTS:-256,64}
WORKERS=${WORKERS:-}
LIMIT_S=${LIMIT_S:-420}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.log "$OUT"/*.xml
started=$SECONDS
failed=()

python -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible")
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
'
echo "cores: $(nproc)  WORKERS=${WORKERS:-default} DTYPES=$DTYPES REPS=$REPS SECONDS_PER_LEVEL=$SECONDS_PER_LEVEL"

# step NAME MAX_SECONDS COMMAND...: run COMMAND with its output shown and kept in $OUT/NAME.log, under
# MAX_SECONDS or what is left of LIMIT_S, whichever is less; sets $rc and never stops the script.
step() {
    local name=$1 max=$2
    shift 2
    local left=$((LIMIT_S - (SECONDS - started)))
    ((max > left)) && max=$left
    if ((max < 30)); then
        echo "== $name: skipped, the run's time limit (LIMIT_S=$LIMIT_S) is spent"
        rc=124
        failed+=("$name (skipped)")
        return
    fi
    echo
    echo "== $name (limit ${max}s, $((SECONDS - started))s into the run)"
    local begun=$SECONDS
    set +e
    # SIGINT first: the benchmarks stop their servers on KeyboardInterrupt; SIGKILL 20 s later.
    timeout --signal=INT --kill-after=20 "$max" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    echo "-- $name: exit $rc after $((SECONDS - begun))s"
    if ((rc != 0)); then
        failed+=("$name (exit $rc$( ((rc == 124)) && echo ", over its time limit"))")
    fi
}

step cuda-tests 180 python -m pytest -q -m cuda -p no:cacheprovider --junitxml "$OUT/cuda-tests.xml"
tests_rc=$rc

for workers in ${WORKERS:-default}; do
    workers_arg=()
    [[ $workers != default ]] && workers_arg=(--workers "$workers")
    step "serving-bfloat16-workers-$workers" 180 python bench/serving.py --device cuda --dtype bfloat16 \
        --clients "$CLIENTS" --seconds "$SECONDS_PER_LEVEL" --warmup 4 --engine-reps "$REPS" \
        ${workers_arg[@]+"${workers_arg[@]}"} --json "$OUT/serving-bfloat16-workers-$workers.json"
done

for dtype in $DTYPES; do
    for model in $MODELS; do
        step "engine-$model-$dtype" 150 python bench/engine.py --device cuda --dtype "$dtype" \
            --model "$model" --reps "$REPS" --json "$OUT/engine-$model-$dtype.json"
    done
done

echo
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
fmt = lambda v, spec=".1f": "-" if v is None else format(v, spec)
print("| engine (seq/s) | dtype | bare | engine, no adapter | engine K=1 | engine K=64 | PEFT mixed K=64 | engine/PEFT mixed |")
print("|---|---|---|---|---|---|---|---|")
for path in sorted(out.glob("engine-*.json")):
    r = json.loads(path.read_text())
    s = r["seq_per_s"]
    mixed, ours = s.get("c: peft mixed K=64"), s.get("b: engine K=64")
    cells = [s.get("a: bare model"), s.get("engine, no adapter"), s.get("b: engine K=1"), ours, mixed]
    ratio = ours / mixed if ours and mixed else None
    print(f"| {r['model']} | {r['dtype']} | " + " | ".join(map(fmt, cells)) + f" | {fmt(ratio, '.2f')} |")
print("\n| serving, 64 adapters | workers | clients | req/s | p50 ms | p99 ms | mean batch | vs engine-only "
      "| server CPU/req | load generator |")
print("|---|---|---|---|---|---|---|---|---|---|")
for path in sorted(out.glob("serving-*.json")):
    r = json.loads(path.read_text())
    for level in r["levels"]:
        print(
            f"| {r['dtype']} | {r.get('workers') or 'default'} | {level['clients']} | "
            f"{level['requests_per_s']:.1f} | {level['p50_ms']:.0f} | {level['p99_ms']:.0f} | "
            f"{level['mean_batch_rows']:.1f} | {level['vs_engine_only']:.2f}x | "
            f"{level.get('server_cpu_us_per_request', float('nan')):.0f} us | "
            f"{level.get('load_generator_cores', float('nan')):.2f} cores |"
        )
EOF

echo
echo "CUDA-marked tests: $( ((tests_rc == 0)) && echo passed || echo "FAILED (exit $tests_rc)") (log: $OUT/cuda-tests.log)"
if ((${#failed[@]})); then
    printf 'failed: %s\n' "${failed[@]}"
fi
echo "total: $((SECONDS - started))s"
((tests_rc != 0)) && exit 1
((${#failed[@]})) && exit 2
exit 0
