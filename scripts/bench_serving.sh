#!/usr/bin/env bash
# Serving benchmark: starts a release moe-serve on a free port and drives it
# with moe-loadgen at 1, 8, 32 and 64 concurrent streaming clients, printing
# output tokens/s, TTFT and inter-token latency per level and the ratio of
# each level's throughput to one client's, all measured in one run.
#
# Usage: scripts/bench_serving.sh [serve args...]
#   scripts/bench_serving.sh                                   # the built-in model
#   scripts/bench_serving.sh --model /tmp/large --random-weights   # a random-weight shape
# Environment: CONCURRENCY (default 1,8,32,64), LOADGEN_ARGS (extra moe-loadgen flags, e.g. "--max-tokens 32
# --requests-per-client 2"), MODEL_NAME (served name, default: from /v1/models).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p moe-server -p moe-tests --bin moe-serve --bin moe-loadgen
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
GPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
LOG=$(mktemp)
target/release/moe-serve serve --port "$PORT" --grpc-port "$GPORT" "$@" >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then break; fi
    kill -0 $PID 2>/dev/null || { cat "$LOG"; exit 1; }
    sleep 0.2
done
NAME=${MODEL_NAME:-$(curl -s "http://127.0.0.1:$PORT/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')}
echo "model: $NAME ($*)"
# shellcheck disable=SC2086
target/release/moe-loadgen --url "http://127.0.0.1:$PORT" --model "$NAME" --concurrency "${CONCURRENCY:-1,8,32,64}" ${LOADGEN_ARGS:-}
