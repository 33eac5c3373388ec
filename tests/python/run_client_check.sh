#!/usr/bin/env bash
# Starts moe-serve with its REST and gRPC APIs on free loopback ports, waits for
# GET /health to answer 200, runs one client check against it, stops the server and
# exits with the check's status.
#
# Usage: tests/python/run_client_check.sh openai|harmony|grpc|reflection PATH/TO/moe-serve [extra `serve` arguments...]
#   openai: openai_client_check.py (the official openai package) against the REST API
#   harmony: harmony_client_check.py (the official openai package): content and
#           reasoning_content of harmony chat completions (serve the model its
#           --make-model writes)
#   grpc:   grpc_client_check.py (grpcio stubs generated from proto/moe/v1/moe.proto at
#           run time into a temporary directory) against the gRPC API
#   reflection: grpc_reflection_check.py (grpcio-reflection, v1alpha) discovers moe.v1 and
#           calls Generate through the discovered descriptors
#   e.g. tests/python/run_client_check.sh grpc target/debug/moe-serve
#        MOE_MODEL_NAME=tsm-test tests/python/run_client_check.sh openai target/debug/moe-serve --model /tmp/tsm-test
# Environment:
#   PYTHON              interpreter to use (default python3)
#   MOE_SERVE_API_KEY   if set, passed to the server as --api-key and to the check
#   MOE_MODEL_NAME      model name to check (default tiny-shakespeare-moe)
#   HEALTH_TIMEOUT      seconds to wait for /health (default 120)
# The client packages are installed from requirements.txt (quietly) if they cannot be imported.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 openai|harmony|grpc|reflection PATH/TO/moe-serve [extra serve arguments...]" >&2
    exit 2
fi
KIND=$1
BIN=$2
shift 2
case "$KIND" in
    openai) IMPORTS='import openai'; CHECK=openai_client_check.py ;;
    harmony) IMPORTS='import openai'; CHECK=harmony_client_check.py ;;
    grpc) IMPORTS='import grpc, grpc_tools, grpc_health.v1.health_pb2'; CHECK=grpc_client_check.py ;;
    reflection) IMPORTS='import grpc, grpc_reflection.v1alpha.proto_reflection_descriptor_database'; CHECK=grpc_reflection_check.py ;;
    *) echo "error: unknown check $KIND (openai, grpc or reflection)" >&2; exit 2 ;;
esac
if [[ ! -x "$BIN" ]]; then
    echo "error: $BIN is not an executable file" >&2
    exit 2
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-python3}
MODEL=${MOE_MODEL_NAME:-tiny-shakespeare-moe}
TIMEOUT=${HEALTH_TIMEOUT:-120}

if ! "$PY" -c "$IMPORTS" 2>/dev/null; then
    echo "installing the $KIND client packages from $HERE/requirements.txt"
    "$PY" -m pip install --quiet --disable-pip-version-check -r "$HERE/requirements.txt"
fi

# Two free ports: bind port 0 twice (both held at once, so they differ), read the numbers
# the kernel chose, release them for the server.
read -r PORT GRPC_PORT < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
')
BASE="http://127.0.0.1:$PORT"
TARGET="127.0.0.1:$GRPC_PORT"

SERVE_ARGS=(serve --port "$PORT" --grpc-port "$GRPC_PORT" "$@")
case "$KIND" in
    openai | harmony) CHECK_ARGS=(--base-url "$BASE/v1" --model "$MODEL") ;;
    grpc | reflection) CHECK_ARGS=(--target "$TARGET" --model "$MODEL") ;;
esac
if [[ -n "${MOE_SERVE_API_KEY:-}" ]]; then
    SERVE_ARGS+=(--api-key "$MOE_SERVE_API_KEY")
    CHECK_ARGS+=(--api-key "$MOE_SERVE_API_KEY")
fi

LOG=$(mktemp "${TMPDIR:-/tmp}/moe-serve-$KIND-check.XXXXXX")
SERVER_PID=""

cleanup() {
    local rc=$?
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        # Give it 10 s to shut down gracefully, then force it.
        for _ in $(seq 1 100); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ $rc -ne 0 ]]; then
        echo "---- last lines of the server log ($LOG) ----" >&2
        tail -n 40 "$LOG" >&2 || true
    else
        rm -f "$LOG"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "starting: $BIN ${SERVE_ARGS[*]}"
"$BIN" "${SERVE_ARGS[@]}" >"$LOG" 2>&1 &
SERVER_PID=$!

deadline=$((SECONDS + TIMEOUT))
until "$PY" -c 'import sys, urllib.request; sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)' \
    "$BASE/health" 2>/dev/null; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        wait "$SERVER_PID" && status=0 || status=$?
        echo "error: the server exited (status $status) before /health answered 200" >&2
        exit 1
    fi
    if ((SECONDS >= deadline)); then
        echo "error: $BASE/health did not answer 200 within $TIMEOUT s" >&2
        exit 1
    fi
    sleep 0.5
done
echo "server ready on $BASE (REST) and $TARGET (gRPC)"

set +e
"$PY" "$HERE/$CHECK" "${CHECK_ARGS[@]}"
rc=$?
set -e
exit "$rc"
