#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time, one after another.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60, all targets)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). Works on the stable toolchain:
# RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags. Corpora grow in
# fuzz/corpus/TARGET (git-ignored), seeded from fuzz/seeds/TARGET (committed);
# a crash leaves its input in fuzz/artifacts/TARGET/ and stops the script with
# a non-zero exit. Reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none TARGET fuzz/artifacts/TARGET/crash-...
# and turn it into a regression test named after it in the crate that owns the code.
#
# FUZZ_SANITIZER (default none; address works too, at about half the speed)
# FUZZ_JOBS: parallel fuzzing processes per target (default 1).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs=${1:-60}
shift || true
sanitizer=${FUZZ_SANITIZER:-none}
jobs=${FUZZ_JOBS:-1}
export RUSTC_BOOTSTRAP=1

command -v cargo-fuzz >/dev/null || {
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
    exit 2
}
if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# one build for all targets (release, debug assertions on: overflow is a finding)
cargo fuzz build --sanitizer "$sanitizer" --debug-assertions

for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "== fuzzing $t for ${secs}s"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    cargo fuzz run --sanitizer "$sanitizer" --debug-assertions --jobs "$jobs" "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -max_len=65536 -timeout=10 -rss_limit_mb=4096 -print_final_stats=1
done
echo "fuzzing done: no crashes in ${#targets[@]} targets, ${secs}s each"
