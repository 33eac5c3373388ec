#!/usr/bin/env bash
# Container health check: exit 0 when GET /health on the local server answers
# 200 (model loaded, not draining), 1 otherwise. Needs only bash (/dev/tcp), so
# the image carries no HTTP client. Reads the port the server reads: MOE_PORT.
set -u
port=${MOE_PORT:-8000}
timeout=${MOE_HEALTHCHECK_TIMEOUT:-4}
exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
printf 'GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
IFS= read -r -t "$timeout" status <&3 || exit 1
exec 3<&-
case "$status" in
"HTTP/1."?" 200 "*) exit 0 ;;
*)
    echo "unhealthy: ${status%$'\r'}" >&2
    exit 1
    ;;
esac
