#!/usr/bin/env bash
# The built-in model's routing on real text (issue 7): record a training trace from the
# first 300 kB of the corpus and a held-out one from its last 150 kB (64 windows of 256
# tokens each), solve every method on the first, score all on the second, for 2 GPUs
# (one node) and 4 GPUs (two nodes of two). OUT=dir (default target/placement-real).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-target/placement-real}"
mkdir -p "$OUT"
cargo build --release -p moe-server -p moe-place
P=target/release/moe-place
C=placement/clusters
TEXT=/work/shared/corpora/tinyshakespeare.txt
head -c 300000 "$TEXT" > "$OUT/train.txt"
tail -c 150000 "$TEXT" > "$OUT/heldout.txt"
for part in train heldout; do
  target/release/moe-serve trace --input "$OUT/$part.txt" --output "$OUT/$part.jsonl" --max-windows 64 --threads 1
done
for cl in tiny-2gpu tiny-4gpu; do
  d="$OUT/$cl"; mkdir -p "$d"
  s() { local name=$1; shift; "$P" solve --trace "$OUT/train.jsonl" --cluster "$C/$cl.toml" "$@" --out "$d/$name.json" > "$d/$name.report" 2> "$d/$name.log"; }
  for m in contiguous round-robin greedy moetuner; do s "$m" --method "$m"; done
  s joint --method joint --time-limit 60
  s greedy+2r --method greedy --replicas 2
  s greedy+ls --method greedy --local-search --time-limit 20
  s moetuner+ls --method moetuner --local-search --time-limit 20
  "$P" eval --trace "$OUT/heldout.jsonl" --cluster "$C/$cl.toml" --heatmap "$d/heatmap.svg" \
    "$d"/{contiguous,round-robin,greedy,greedy+2r,greedy+ls,moetuner,moetuner+ls,joint}.json | tee "$d/eval.md"
done
