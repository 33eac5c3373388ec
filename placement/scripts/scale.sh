#!/usr/bin/env bash
# Scale runs of moe-place (issue 7), not part of the test suite:
#   Mixtral shape (32 MoE layers x 8 experts, top-2) on 4 and 8 GPUs (one node), 60 s limit;
#   DeepSeek-V3 shape (58 MoE layers x 256 experts, top-8) on 32 and 64 GPUs (nodes of 8):
#   moetuner+ls 300 s limit, the others moe-place's default 60 s (about 25 minutes in all).
# Synthetic traces (moe-place synth): a training trace and a held-out one of the same
# synthetic "model" (same --seed, another --sample-seed). Every plan is scored on the
# held-out trace. Usage: placement/scripts/scale.sh [mixtral|deepseek|all]; OUT=dir to
# choose where traces, plans, reports and heatmaps go (default target/placement-scale).
set -euo pipefail
cd "$(dirname "$0")/../.."
which="${1:-all}"
cargo build --release -p moe-place
P=target/release/moe-place
C=placement/clusters
OUT="${OUT:-target/placement-scale}"
mkdir -p "$OUT"

solve() { # name cluster method-args...
  local name=$1 cluster=$2; shift 2
  echo "== $name"
  "$P" solve --trace "$train" --cluster "$C/$cluster.toml" "$@" --out "$OUT/$name.json" \
    > "$OUT/$name.report" 2> "$OUT/$name.log"
  grep -E '^(solve|stage|joint|swap|layer)' "$OUT/$name.report"
}

if [[ $which == all || $which == mixtral ]]; then
  train="$OUT/mixtral-train.jsonl"; heldout="$OUT/mixtral-heldout.jsonl"
  "$P" synth --shape mixtral --tokens 16384 --seed 1 --sample-seed 1 --out "$train"
  "$P" synth --shape mixtral --tokens 16384 --seed 1 --sample-seed 2 --out "$heldout"
  for g in 4 8; do
    solve "mixtral-$g-greedy" "mixtral-${g}gpu" --method greedy
    solve "mixtral-$g-moetuner" "mixtral-${g}gpu" --method moetuner --time-limit 60
    solve "mixtral-$g-moetuner+ls" "mixtral-${g}gpu" --method moetuner --time-limit 60 --local-search
    solve "mixtral-$g-joint" "mixtral-${g}gpu" --method joint --time-limit 60 --gap 0.025
    "$P" eval --trace "$heldout" --cluster "$C/mixtral-${g}gpu.toml" --heatmap "$OUT/mixtral-$g.svg" \
      "$OUT"/mixtral-$g-{greedy,moetuner,moetuner+ls,joint}.json | tee "$OUT/mixtral-$g-eval.md"
  done
fi

if [[ $which == all || $which == deepseek ]]; then
  train="$OUT/deepseek-train.jsonl"; heldout="$OUT/deepseek-heldout.jsonl"
  "$P" synth --shape deepseek-v3 --tokens 8192 --seed 1 --sample-seed 1 --out "$train"
  "$P" synth --shape deepseek-v3 --tokens 8192 --seed 1 --sample-seed 2 --out "$heldout"
  for g in 32 64; do
    solve "deepseek-$g-greedy" "deepseek-${g}gpu" --method greedy
    solve "deepseek-$g-greedy+ls" "deepseek-${g}gpu" --method greedy --local-search
    solve "deepseek-$g-moetuner+ls" "deepseek-${g}gpu" --method moetuner --time-limit 300 --local-search
    # the load/traffic trade-off: each GPU may rise to 1.02 x the layer mean
    solve "deepseek-$g-greedy+ls-slack0.02" "deepseek-${g}gpu" --method greedy --local-search --load-slack 0.02
    "$P" eval --trace "$heldout" --cluster "$C/deepseek-${g}gpu.toml" --heatmap "$OUT/deepseek-$g.svg" \
      "$OUT"/deepseek-$g-{greedy,greedy+ls,moetuner+ls,greedy+ls-slack0.02}.json | tee "$OUT/deepseek-$g-eval.md"
  done
fi
