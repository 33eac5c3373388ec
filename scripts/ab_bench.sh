#!/usr/bin/env bash
# Side-by-side `moe-serve bench` of two binaries, alternated ROUNDS times in
# one sitting (this machine's noise then shows in both columns alike).
#
#   scripts/ab_bench.sh OLD_BINARY NEW_BINARY [ROUNDS] [-- extra bench flags]
#
# Example (the previous commit's binary against this one):
#   git worktree add /tmp/old HEAD~1 && (cd /tmp/old && CARGO_TARGET_DIR=/tmp/old-target cargo build --release -p moe-server)
#   cargo build --release -p moe-server
#   scripts/ab_bench.sh /tmp/old-target/release/moe-serve target/release/moe-serve 3
# Prints every run's figures, prefixed by which binary made them.
set -euo pipefail
old=$1 new=$2 rounds=${3:-3}
shift $(( $# < 3 ? $# : 3 ))
[[ ${1:-} == -- ]] && shift
model=${MODEL:-models/tiny-shakespeare-moe}
for r in $(seq "$rounds"); do
    for which in old new; do
        bin=$old; [[ $which == new ]] && bin=$new
        "$bin" bench --model "$model" --repeats 2 "$@" 2>/dev/null |
            awk -v w="$which" -v r="$r" '/^\| (tiny|random)|^\| [0-9]/ { print w, "run", r, $0 }'
    done
done
