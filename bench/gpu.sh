#!/usr/bin/env bash
# On one CUDA GPU, in one run: the golden tests on CUDA (LORAPLEX_TEST_DEVICE=cuda: every family, every
# task in one mixed batch, the LoRA op and its fused kernels, the encoder through CUDA graphs, and the
# CUDA-marked tests) in each mode, then the engine benchmarks (MiniLM and the bert-base shape, bfloat16)
# and the share of the matmul peak on a 16k-token batch (bench/peak.py, bert-base shape) in each mode,
# then one table of the figures. The modes: `eager` (torch's ops), `fused` (the fused Triton LoRA kernels,
# LORAPLEX_TRITON_LORA=1) and `graphs` (the encoder replayed from CUDA graphs, LORAPLEX_CUDA_GRAPHS=1).
# The serving benchmark (64 adapters, 256 and 64 closed-loop clients) runs when SERVING=1.
#
#     bench/gpu.sh                    # REPS=5; tests, then the engine benchmarks
#     SERVING=1 bench/gpu.sh          # the serving benchmark too; WORKERS=4: loraplex serve --workers 4
#     SERVING=1 SERVING_MODE=graphs bench/gpu.sh   # ... with the server's engine in one of the modes
#     DTYPES="float16 bfloat16" bench/gpu.sh   # the engine benchmarks in float16 too
#     MODES="eager graphs" bench/gpu.sh        # leave the fused kernels out
#
# The golden tests here leave out those that start a live server (the family tests' check_live_server and
# the per-task HTTP tests), which would take most of the run; `LORAPLEX_TEST_DEVICE=cuda python -m pytest
# tests/test_task_classify.py` runs those on the GPU. Every step runs under a time limit and the whole run
# stops starting steps after LIMIT_S (default 450 s), so that it ends within 8 minutes even when a step
# hangs; a step it cuts or skips is reported as failed.
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
SERVING=${SERVING:-0}
SERVING_MODE=${SERVING_MODE:-eager}
MODES=${MODES:-"eager fused graphs"}
LIMIT_S=${LIMIT_S:-450}
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

# The golden tests on CUDA, engine-level (no live servers), then the CUDA-marked tests of other files.
GOLDEN=(tests/test_family_*.py tests/test_task_mixed.py tests/test_engine.py tests/test_engine_graphs.py
    tests/test_lora_ops.py tests/test_lora_batch.py tests/test_lora_triton.py)
# The CUDA-marked tests of other files (a `-m cuda` run lists them).
CUDA_MARKED=(tests/test_serving_processes.py::test_the_server_on_cuda_answers_as_the_engine_on_the_cpu)
# mode_env MODE: the environment that turns MODE on
mode_env() {
    case $1 in
        eager) echo LORAPLEX_TRITON_LORA=0 LORAPLEX_CUDA_GRAPHS=0 ;;
        fused) echo LORAPLEX_TRITON_LORA=1 LORAPLEX_CUDA_GRAPHS=0 ;;
        graphs) echo LORAPLEX_TRITON_LORA=0 LORAPLEX_CUDA_GRAPHS=1 ;;
        *) echo "unknown mode $1 (eager, fused, graphs)" >&2; exit 1 ;;
    esac
}
for mode in $MODES $SERVING_MODE; do mode_env "$mode" >/dev/null; done  # an unknown mode stops the run here
tests_rc=0
for mode in $MODES; do
    # shellcheck disable=SC2046
    step "cuda-tests-$mode" 120 env LORAPLEX_TEST_DEVICE=cuda $(mode_env "$mode") \
        python -m pytest -q -p no:cacheprovider -k "not live_server" --junitxml "$OUT/cuda-tests-$mode.xml" \
        "${GOLDEN[@]}" "${CUDA_MARKED[@]}"
    if ((rc != 0)); then tests_rc=$rc; fi
done

for workers in ${WORKERS:-default}; do
    ((SERVING)) || break
    workers_arg=()
    [[ $workers != default ]] && workers_arg=(--workers "$workers")
    # shellcheck disable=SC2046
    step "serving-bfloat16-workers-$workers" 180 env $(mode_env "$SERVING_MODE") python bench/serving.py \
        --device cuda --dtype bfloat16 \
        --clients "$CLIENTS" --seconds "$SECONDS_PER_LEVEL" --warmup 4 --engine-reps "$REPS" \
        ${workers_arg[@]+"${workers_arg[@]}"} --json "$OUT/serving-bfloat16-workers-$workers.json"
done

for dtype in $DTYPES; do
    for model in $MODELS; do
        for mode in $MODES; do
            # shellcheck disable=SC2046
            step "engine-$model-$dtype-$mode" 60 env $(mode_env "$mode") python bench/engine.py \
                --device cuda --dtype "$dtype" --model "$model" --ks 1,64 --reps "$REPS" \
                --json "$OUT/engine-$model-$dtype-$mode.json"
        done
        [[ $model == bert-base ]] || continue
        for mode in $MODES; do
            # shellcheck disable=SC2046
            step "peak-$model-$dtype-$mode" 60 env $(mode_env "$mode") python bench/peak.py \
                --device cuda --dtype "$dtype" --model "$model" --tokens 16384 --length 128 --ks 0,64 \
                --reps "$REPS" --json "$OUT/peak-$model-$dtype-$mode.json"
        done
    done
done

echo
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
fmt = lambda v, spec=".1f": "-" if v is None else format(v, spec)
print("| engine (seq/s) | dtype | mode | bare | engine, no adapter | engine K=1 | engine K=64 "
      "| PEFT mixed K=64 | K=64 / no adapter |")
print("|---|---|---|---|---|---|---|---|---|")
for path in sorted(out.glob("engine-*.json")):
    r = json.loads(path.read_text())
    s = r["seq_per_s"]
    base, ours = s.get("engine, no adapter"), s.get("b: engine K=64")
    cells = [s.get("a: bare model"), base, s.get("b: engine K=1"), ours, s.get("c: peft mixed K=64")]
    ratio = ours / base if ours and base else None
    mode = path.stem.rsplit("-", 1)[1]
    print(f"| {r['model']} | {r['dtype']} | {mode} | " + " | ".join(map(fmt, cells)) + f" | {fmt(ratio, '.2f')} |")
print("\n| 16k-token batch | dtype | mode | pass | seq/s | tokens/s | TFLOP/s | of measured matmul peak "
      "| of listed peak |")
print("|---|---|---|---|---|---|---|---|---|")
for path in sorted(out.glob("peak-*.json")):
    r = json.loads(path.read_text())
    mode = path.stem.rsplit("-", 1)[1]
    for name, v in r["results"].items():
        listed = "-" if v["of_listed_peak"] is None else f"{v['of_listed_peak']:.1%}"
        print(f"| {r['model']} | {r['dtype']} | {mode} | {name} | {v['seq_per_s']:.1f} | {v['tokens_per_s']:.0f} "
              f"| {v['tflop_per_s']:.1f} | {v['of_measured_peak']:.1%} | {listed} |")
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
echo "CUDA tests ($MODES): $( ((tests_rc == 0)) && echo passed || echo "FAILED (exit $tests_rc)") (logs: $OUT/cuda-tests-*.log)"
if ((${#failed[@]})); then
    printf 'failed: %s\n' "${failed[@]}"
fi
echo "total: $((SECONDS - started))s"
((tests_rc != 0)) && exit 1
((${#failed[@]})) && exit 2
exit 0
