#!/usr/bin/env bash
# GPU check of the CUDA backend (issue 19), for a machine with an NVIDIA GPU.
#
#   scripts/gpu-check.sh [--only PART]   build with --features cuda (offline), then check
#   scripts/gpu-check.sh --prebuild DIR  (here, with cargo) build release binaries, strip and
#                                        xz them into DIR (about 8 MB), for a GPU machine without cargo
#   scripts/gpu-check.sh --prebuilt DIR [--only PART]
#                                        run the binaries from DIR (carry DIR to the GPU machine)
#
# PART: kernels, ops, fidelity, builtin, large or serve (default: all). Prints everything to
# stdout, needs no network, and stops itself within 8 minutes (each phase has its own
# time limit). Exit status is non-zero if any check fails or no GPU is usable.
#
# What it checks:
# - kernels: NVRTC compiles the kernel source for the device; every CUDA kernel against its
#   CPU counterpart (kernels/tests/cuda_vs_cpu.rs); kernels/examples/cuda_bench.rs
#   (pinned host-to-device bandwidth, expert products, attention, copy/compute overlap);
# - ops: every operation of the device forward pass on the GPU against the host device (the
#   same pass on host memory, which the fidelity tests hold to transformers on every machine);
# - fidelity: the GPU forward pass on every fixture it supports against transformers'
#   logits (tolerance moe_bench::gpu::GPU_LOGIT_TOL of the largest logit: bf16 activations),
#   routing and greedy tokens; DeepSeek and gpt-oss refused with a clear error;
# - builtin: the built-in model's greedy tokens on the GPU against the CPU, and unchanged
#   by every expert budget (25%, 50%), policy and predictor (learned, hidden, lookahead,
#   previous) of the GPU tier, with each one's hit ratio, copies done when needed, bytes
#   copied per token and tokens/s;
# - large: the bench shape (1.19B parameters, bf16): prefill and decode tokens/s fully
#   resident and at 50% and 25% expert budgets, LRU and the predictors;
# - serve: moe-serve generate --device cuda against --device cpu (greedy text).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
FAILED=0
MODE=build
DIR=""
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prebuild) MODE=prebuild; DIR=${2:?--prebuild needs a directory}; shift 2 ;;
    --prebuilt) MODE=prebuilt; DIR=${2:?--prebuilt needs a directory}; shift 2 ;;
    --only) ONLY=${2:?--only needs a part}; shift 2 ;;
    *) echo "usage: $0 [--prebuild DIR | --prebuilt DIR] [--only kernels|ops|fidelity|builtin|large|serve]"; exit 2 ;;
  esac
done
part() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }

elapsed() { echo $(( $(date +%s) - START )); }
section() { echo; echo "=== $* (t=$(elapsed)s)"; }

# cudarc (built for CUDA 12.4 names) looks for libnvrtc.so / libcublas.so and
# their .12 names; CUDA 13 or pip-installed libraries only have other
# versioned names. Link what is found into one directory on LD_LIBRARY_PATH.
setup_libs() {
  local shim; shim=$(mktemp -d /tmp/gpu-check-libs.XXXXXX)
  local dirs=(/usr/local/cuda/lib64 /usr/local/cuda-*/lib64 /usr/local/cuda-*/targets/x86_64-linux/lib
              /usr/lib/x86_64-linux-gnu /usr/lib64)
  local py
  for py in $(python3 -c 'import site,sys; print(" ".join(site.getsitepackages()+[site.getusersitepackages()]))' 2>/dev/null); do
    dirs+=("$py"/nvidia/*/lib "$py"/nvidia/cu*/lib)
  done
  local lib d f extra=""
  for lib in nvrtc cublas cublasLt; do
    for d in "${dirs[@]}"; do
      for f in "$d"/lib$lib.so.[0-9]*; do
        [ -e "$f" ] || continue
        case "$f" in *builtins*) continue ;; esac
        ln -sf "$f" "$shim/lib$lib.so"
        extra="$extra:$d"
        echo "lib$lib: $f"
        break 2
      done
    done
    [ -e "$shim/lib$lib.so" ] || echo "lib$lib: not found (the tests needing it will say so)"
  done
  export LD_LIBRARY_PATH="$shim$extra${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

section "machine"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv \
    || nvidia-smi
else
  echo "nvidia-smi: not found"
fi

# --- build (release, stripped, xz-compressed: the GPU machine has no cargo, and what
# travels there is limited to 64 MiB with the working tree)
NAMES="moe_kernels_lib cuda_vs_cpu cuda_bench moe-gpu-check moe-serve"
build() {
  local out=$1 log; log=$(mktemp)
  command -v cargo >/dev/null || { echo "cargo not found: build elsewhere with --prebuild DIR and run with --prebuilt DIR"; exit 1; }
  section "build with --features cuda (release, offline)"
  find_exe() { sed -n "s|.*Executable $1 (\(.*\))|\1|p" | head -1; }
  if ! cargo test --offline --release -p moe-kernels --features cuda --no-run >"$log" 2>&1; then
    tail -30 "$log"; echo "BUILD FAILED (moe-kernels tests)"; exit 1
  fi
  local klib ktest
  klib=$(find_exe "unittests src/lib.rs" <"$log"); ktest=$(find_exe "tests/cuda_vs_cpu.rs" <"$log")
  if ! cargo build --offline --release -p moe-kernels --features cuda --example cuda_bench >"$log" 2>&1 \
    || ! cargo build --offline --release -p moe-bench --features cuda --bin moe-gpu-check >"$log" 2>&1 \
    || ! cargo build --offline --release -p moe-server --features cuda --bin moe-serve >"$log" 2>&1; then
    tail -30 "$log"; echo "BUILD FAILED"; exit 1
  fi
  mkdir -p "$out"
  local src dst
  for pair in "$klib:moe_kernels_lib" "$ktest:cuda_vs_cpu" "target/release/examples/cuda_bench:cuda_bench" \
              "target/release/moe-gpu-check:moe-gpu-check" "target/release/moe-serve:moe-serve"; do
    src=${pair%%:*}; dst=$out/${pair##*:}
    strip -o "$dst" "$src" && xz -f -6 "$dst" || { echo "cannot pack $src"; exit 1; }
  done
  ls -la "$out"
  echo "built in $(elapsed)s"
}

if [ "$MODE" = prebuild ]; then
  build "$DIR"
  echo "binaries in $DIR; on the GPU machine: scripts/gpu-check.sh --prebuilt $DIR"
  exit 0
fi
if [ "$MODE" = build ]; then
  DIR=target/gpu-check
  build "$DIR"
fi
BIN=$(mktemp -d /tmp/gpu-check-bin.XXXXXX)
for n in $NAMES; do
  if [ -e "$DIR/$n.xz" ]; then xz -dc "$DIR/$n.xz" >"$BIN/$n"; else cp "$DIR/$n" "$BIN/$n"; fi
  chmod +x "$BIN/$n"
done
setup_libs

# --- checks
if part kernels; then
  section "NVRTC compiles every kernel; missing-driver path"
  timeout 60 "$BIN/moe_kernels_lib" --nocapture --test-threads=1 cuda:: || FAILED=1

  section "kernels vs CPU on the GPU"
  OUT=$(mktemp)
  timeout 120 "$BIN/cuda_vs_cpu" --nocapture --test-threads=1 2>&1 | tee "$OUT"
  [ "${PIPESTATUS[0]}" -eq 0 ] || FAILED=1
  if grep -q "SKIPPED (no usable GPU)" "$OUT"; then
    echo "NO USABLE GPU: the comparisons above were skipped, so nothing was checked on a GPU"
    FAILED=1
  fi

  section "kernel benchmark (kernels/examples/cuda_bench.rs)"
  timeout 60 "$BIN/cuda_bench" || FAILED=1
fi

for p in ops fidelity builtin large; do
  if part $p; then
    section "model check: $p (bench/src/bin/moe-gpu-check.rs)"
    timeout 240 "$BIN/moe-gpu-check" --only $p --fixtures tests/fixtures --model models/tiny-shakespeare-moe || FAILED=1
  fi
done

if part serve; then
  section "moe-serve generate --device cuda against --device cpu (greedy)"
  for dev in cpu cuda; do
    echo "--device $dev:"
    timeout 60 "$BIN/moe-serve" generate --model models/tiny-shakespeare-moe --prompt "ROMEO:" --max-tokens 48 \
      --temperature 0 --device $dev || FAILED=1
  done
  echo "--device cuda --expert-cache 50% --expert-policy predictive --predictor auto:"
  timeout 60 "$BIN/moe-serve" generate --model models/tiny-shakespeare-moe --prompt "ROMEO:" --max-tokens 48 \
    --temperature 0 --device cuda --expert-cache 50% || FAILED=1
fi

section "not done on the GPU (known)"
cat <<'EOF2'
- DeepSeek/Kimi (latent attention) and gpt-oss (sinks, clamped SwiGLU, MXFP4) run on the CPU only;
  quantized (GGUF) weights too: the GPU computes with bf16 and f32 weights;
- sampling other than on the host (logits of the sampled rows are copied back each step);
- routing runs on the host (router logits copied back per MoE layer: one synchronisation per layer);
- the larger-than-RAM disk tier under the GPU tier: every expert is staged in pinned host memory.
EOF2

section "done"
echo "total $(elapsed)s; $( [ $FAILED -eq 0 ] && echo PASS || echo FAIL )"
exit $FAILED
