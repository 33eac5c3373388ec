#!/usr/bin/env bash
# Reproduces the expert-offloading and regrouping figures in BENCHMARKS.md.
#
#   scripts/bench_offload.sh [CORPUS] [OUT_DIR]
#
# CORPUS defaults to ../shared/corpora/tinyshakespeare.txt. It is split like the
# default model's training script (first newline at or after 90%): the first part
# trains the path predictor (with RETRAIN=1; the committed predictor was trained
# this way on its first 600 windows), the last 10% (never seen by the model or the
# predictor) is the held-out text the benchmarks draw prompts from. The regrouping
# benchmark mixes that with prose (ARCHITECTURE.md) and Rust source code.
set -euo pipefail
cd "$(dirname "$0")/.."
corpus=${1:-../shared/corpora/tinyshakespeare.txt}
out=${2:-target/bench-offload}
mkdir -p "$out"
python3 - "$corpus" "$out" <<'PY'
import sys
text = open(sys.argv[1], encoding="utf-8").read()
cut = text.index("\n", int(len(text) * 0.9)) + 1
open(f"{sys.argv[2]}/train.txt", "w", encoding="utf-8").write(text[:cut])
open(f"{sys.argv[2]}/heldout.txt", "w", encoding="utf-8").write(text[cut:])
PY
cp ARCHITECTURE.md "$out/prose.md"
cat server/src/frontend/*.rs server/src/http/*.rs > "$out/code.rs"
cargo build --release -p moe-server
bin=target/release/moe-serve
if [ "${RETRAIN:-0}" = 1 ]; then
    $bin trace --input "$out/train.txt" --output "$out/train.jsonl" --max-windows 600
    $bin train-predictor --trace "$out/train.jsonl" --output models/tiny-shakespeare-moe/path_predictor.safetensors
fi
# DISK_IO: how experts beyond the budget are read (default direct, as `serve` reads them;
# cached goes through the page cache, which holds this small model's whole file)
io=${DISK_IO:-direct}
$bin bench-offload --text "$out/heldout.txt" --decode-tokens 192 --sequences 1 --svg "$out/hit-batch1.svg" --disk-io "$io"
$bin bench-offload --text "$out/heldout.txt" --decode-tokens 128 --sequences 4 --svg "$out/hit-batch4.svg" --large --disk-io "$io"
$bin bench-regroup --text "$out/heldout.txt" "$out/prose.md" "$out/code.rs" --disk-io "$io"
