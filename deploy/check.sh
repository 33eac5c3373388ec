#!/usr/bin/env bash
# CI check of deploy/ (called from .ci/run; runs anywhere, no Docker engine,
# no cluster, loopback only):
#   1. render the Helm chart with Helm's engine, lint it, and validate every
#      manifest against the Kubernetes schemas (deploy/validate_chart.py);
#   2. build the CPU image's binaries with the script deploy/Dockerfile runs
#      (deploy/build-binary.sh, same arguments);
#   3. start that moe-serve the way the image does (its ENV: the baked-in
#      default model through MOE_DEFAULT_MODEL, settings through MOE_*) and
#      wait until the image's HEALTHCHECK script passes, then stop it with
#      SIGTERM and expect a clean exit.
# Usage: deploy/check.sh   (MOE_DEPLOY_VENV: where the Python tools go)
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "== deploy: chart render + schema validation"
venv=${MOE_DEPLOY_VENV:-${TMPDIR:-/tmp}/moe-deploy-venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r deploy/requirements.txt
"$venv/bin/python" deploy/validate_chart.py "$work/manifests"

echo "== deploy: the Dockerfiles build through deploy/build-binary.sh"
grep -qx '    deploy/build-binary.sh /out/bin' deploy/Dockerfile
grep -qx '    deploy/build-binary.sh /out/bin --features moe-server/cuda' deploy/Dockerfile.cuda
bash -n deploy/build-binary.sh deploy/healthcheck.sh

echo "== deploy: the CPU image's binaries"
deploy/build-binary.sh "$work/bin"
if [ -x "$work/bin/moe-place" ]; then
    "$work/bin/moe-place" --help >/dev/null
fi

echo "== deploy: run as the image runs, probe with its health check"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export MOE_PORT MOE_GRPC_PORT
MOE_PORT=$(free_port)
MOE_GRPC_PORT=$(free_port)
if deploy/healthcheck.sh 2>/dev/null; then
    echo "health check passed with no server on port $MOE_PORT" >&2
    exit 1
fi
# as in the image, except the address: loopback only here
(
    cd "$work"
    exec env MOE_DEFAULT_MODEL="$OLDPWD/models/tiny-shakespeare-moe" MOE_HOST=127.0.0.1 RUST_LOG=warn \
        "$work/bin/moe-serve" serve
) &
server_pid=$!
healthy=
for _ in $(seq 1 240); do
    if deploy/healthcheck.sh 2>/dev/null; then
        healthy=1
        break
    fi
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.25
done
[ -n "$healthy" ] || {
    echo "the image's health check never passed" >&2
    exit 1
}
kill -TERM "$server_pid"
status=0
wait "$server_pid" || status=$?
server_pid=
[ "$status" -eq 0 ] || {
    echo "moe-serve exited with $status after SIGTERM" >&2
    exit 1
}
echo "deploy: all checks passed"
