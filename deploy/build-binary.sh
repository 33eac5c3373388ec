#!/usr/bin/env bash
# Builds the release binaries a moe-serve image ships, and copies them to OUT_DIR.
#
#   deploy/build-binary.sh OUT_DIR [extra cargo arguments]
#
# The one place that says how the image's binaries are built: both Dockerfiles
# run it (the CUDA one adds `--features moe-server/cuda`), and deploy/check.sh
# runs it in CI with no extra arguments, exactly as deploy/Dockerfile does.
#
# Builds `moe-serve`, and the placement planner `moe-place` as well once the
# workspace has a binary of that name (placement/ is still being written).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ]; then
    echo "usage: $0 OUT_DIR [extra cargo arguments]" >&2
    exit 2
fi
out=$1
shift

bins=(--bin moe-serve)
if cargo metadata --no-deps --format-version 1 --locked | grep -q '"kind":\["bin"\],[^}]*"name":"moe-place"'; then
    bins+=(--bin moe-place)
fi

cmd=(cargo build --release --locked "${bins[@]}" "$@")
echo "+ ${cmd[*]}" >&2
"${cmd[@]}"

target_dir=${CARGO_TARGET_DIR:-target}
mkdir -p "$out"
for ((i = 1; i < ${#bins[@]}; i += 2)); do
    install -m 0755 "$target_dir/release/${bins[i]}" "$out/${bins[i]}"
done
echo "built: $(cd "$out" && ls)" >&2
