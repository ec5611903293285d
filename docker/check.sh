#!/usr/bin/env bash
# Build the loraplex image and check it for real: without tokens it refuses to start; with them it starts,
# becomes ready, takes a demo adapter, classifies with it, runs as uid 10001, and exits 0 on SIGTERM.
#
#   docker/check.sh [DOCKER BUILD OPTIONS...]
#
# Every argument goes to `docker build` as it is, e.g. where Docker Hub or the PyTorch index is out of reach
# (torch's own dependencies then come from TORCH_INDEX_URL, here PyPI, and the torch wheel from a local folder):
#
#   docker/check.sh --network host --build-arg BASE_IMAGE=my/python:3.11-bookworm \
#       --build-arg TORCH_INDEX_URL=https://pypi.org/simple --build-arg TORCH_FIND_LINKS=http://127.0.0.1:8765/
#
# Environment: IMAGE (the tag built, default loraplex:check), READY_TIMEOUT (seconds to wait for /ready,
# default 300), STOP_TIMEOUT (seconds to wait for the exit after SIGTERM, default 60), DOCKER (default docker).
# Needs curl on the host. Exit status: 0 when every check passed, 77 when no Docker engine is reachable,
# 1 for a failed check (the container's log is printed).
set -euo pipefail

cd "$(dirname "$0")/.."
DOCKER=${DOCKER:-docker}
IMAGE=${IMAGE:-loraplex:check}
READY_TIMEOUT=${READY_TIMEOUT:-300}
STOP_TIMEOUT=${STOP_TIMEOUT:-60}
ADAPTER_DIR=adapters/demo/tweet-sentiment
TOKEN=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')    # the server refuses tokens under 32 characters
API_KEY=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
NAME="loraplex-check-$$"

say() { printf 'check: %s\n' "$*"; }
fail() {
    printf 'check: FAILED: %s\n' "$*" >&2
    if "$DOCKER" container inspect "$NAME" >/dev/null 2>&1; then
        printf -- '--- container log (last 40 lines) ---\n' >&2
        "$DOCKER" logs --tail 40 "$NAME" >&2 2>&1 || true
    fi
    exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

command -v curl >/dev/null || fail "curl is needed on the host"
if ! "$DOCKER" info >/dev/null 2>&1; then
    say "no Docker engine reachable ('$DOCKER info' failed); nothing checked"
    exit 77
fi
cleanup() { "$DOCKER" rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

say "building $IMAGE"
start=$(now)
"$DOCKER" build -f docker/Dockerfile -t "$IMAGE" "$@" . || fail "docker build"
build_s=$(since "$start")
size=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
say "built in ${build_s} s; image size $((size / 1000000)) MB"

# As shipped, with no token given or mounted, the image refuses to start (it listens on 0.0.0.0) and says
# how to make a token.
refusal=$(timeout "$STOP_TIMEOUT" "$DOCKER" run --rm "$IMAGE" 2>&1) && fail "the image started without an API key"
printf '%s' "$refusal" | grep -q 'openssl rand -hex 32' || fail "the refusal does not say how to make a token: $refusal"
say "without tokens the image refuses to start and says how to make one"

# A published port on the loopback interface only; the host picks a free one.
start=$(now)
"$DOCKER" run -d --name "$NAME" -p 127.0.0.1::8000 -e LORAPLEX_ADMIN_TOKEN="$TOKEN" -e LORAPLEX_API_KEY="$API_KEY" \
    "$IMAGE" >/dev/null \
    || fail "docker run"
hostport=$("$DOCKER" port "$NAME" 8000/tcp | head -n 1)
[ -n "$hostport" ] || fail "the container publishes no port for 8000"
base="http://${hostport/0.0.0.0/127.0.0.1}"

deadline=$(($(date +%s) + READY_TIMEOUT))
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$base/ready" || true)" = 200 ]; do
    [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$NAME")" = true ] || fail "the container exited before /ready"
    [ "$(date +%s)" -lt "$deadline" ] || fail "/ready did not answer 200 within ${READY_TIMEOUT} s"
    sleep 0.5
done
ready_s=$(since "$start")
say "/ready answered 200 ${ready_s} s after docker run"

# The main process (PID 1, `loraplex serve` itself in the exec-form ENTRYPOINT) and its user id.
uid=$("$DOCKER" exec "$NAME" sh -c "awk '/^Uid:/ { print \$2 }' /proc/1/status")
[ "$uid" = 10001 ] || fail "the server runs as uid '$uid', not 10001"
say "the server (PID 1) runs as uid $uid"

code=$(curl -s -o /tmp/"$NAME"-put.json -w '%{http_code}' -X PUT "$base/adapters/check-sentiment" \
    -H "Authorization: Bearer $TOKEN" \
    -F "adapter_config=@$ADAPTER_DIR/adapter_config.json;type=application/json" \
    -F "adapter_model=@$ADAPTER_DIR/adapter_model.safetensors;type=application/octet-stream" \
    -F "labels=$(cat "$ADAPTER_DIR/labels.json")")
[ "$code" = 201 ] || fail "PUT /adapters/check-sentiment answered $code: $(cat /tmp/"$NAME"-put.json)"
rm -f /tmp/"$NAME"-put.json
say "uploaded $ADAPTER_DIR as check-sentiment (201)"

reply=$(curl -s -w '\n%{http_code}' -X POST "$base/classify" -H 'Content-Type: application/json' \
    -H "Authorization: Bearer $API_KEY" \
    -d '{"adapter_id": "check-sentiment", "inputs": ["I love this, best day ever!", "This is awful and I hate it."]}')
code=${reply##*$'\n'}
body=${reply%$'\n'*}
[ "$code" = 200 ] || fail "POST /classify answered $code: $body"
labels=$(printf '%s' "$body" | grep -o '"label": *"[a-z]*"' | sed 's/.*"\([a-z]*\)"$/\1/' | tr '\n' ' ')
[ "$labels" = "positive negative " ] || fail "classify gave labels '$labels', expected 'positive negative': $body"
say "classified: $labels(200)"

start=$(now)
"$DOCKER" kill --signal TERM "$NAME" >/dev/null || fail "docker kill --signal TERM"
status=$(timeout "$STOP_TIMEOUT" "$DOCKER" wait "$NAME") || fail "no exit within ${STOP_TIMEOUT} s of SIGTERM"
stop_s=$(since "$start")
[ "$status" = 0 ] || fail "exit status $status after SIGTERM, expected 0"
say "exit status 0, ${stop_s} s after SIGTERM"

say "ok: image $((size / 1000000)) MB, build ${build_s} s, /ready after ${ready_s} s, SIGTERM exit ${stop_s} s"
