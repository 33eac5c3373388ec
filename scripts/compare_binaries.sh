#!/usr/bin/env bash
# Alternated side-by-side run of two moe-serve binaries (e.g. before and after a
# refactor): `bench --no-large` and `bench-offload` on held-out text, A B A B ...,
# so drift in machine load hits both equally. Prints each run's figures.
#
# Usage: scripts/compare_binaries.sh OLD_BIN NEW_BIN [ROUNDS] [CORPUS]
# Both run on this repository's built-in model (--model), so a binary built in another
# checkout finds it too.
set -euo pipefail
old=$1
new=$2
rounds=${3:-2}
corpus=${4:-../shared/corpora/tinyshakespeare.txt}
model=$(cd "$(dirname "$0")/.." && pwd)/models/tiny-shakespeare-moe
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$corpus" "$tmp/heldout.txt" <<'PY'
import sys
text = open(sys.argv[1], encoding="utf-8").read()
cut = text.index("\n", int(len(text) * 0.9)) + 1
open(sys.argv[2], "w", encoding="utf-8").write(text[cut:])
PY
for r in $(seq 1 "$rounds"); do
    for which in old new; do
        bin=${!which}
        echo "=== round $r: $which ($bin) bench"
        "$bin" bench --model "$model" --no-large 2>/dev/null | grep -E '^\| (tiny|[0-9])'
        echo "=== round $r: $which ($bin) bench-offload"
        "$bin" bench-offload --model "$model" --text "$tmp/heldout.txt" --budgets 0.25,0.5 --decode-tokens 64 2>/dev/null \
            | grep -E '^\| (25|50)%'
    done
done
