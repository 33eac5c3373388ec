#!/usr/bin/env bash
# GPU check of the CUDA backend (issue 8), for a machine with an NVIDIA GPU.
#
#   scripts/gpu-check.sh                 build with --features cuda (offline), test, benchmark
#   scripts/gpu-check.sh --prebuild DIR  (on any machine with the crates) build the test and
#                                        benchmark binaries into DIR, for a GPU machine without cargo
#   scripts/gpu-check.sh --prebuilt DIR  run the binaries from DIR instead of building
#
# Prints everything to stdout, needs no network (cargo --offline), and stops
# itself within 8 minutes (each phase has its own time limit). Exit status is
# non-zero if any GPU test fails or no GPU is usable.
#
# What it checks: every CUDA kernel against its CPU counterpart
# (kernels/tests/cuda_vs_cpu.rs), NVRTC compiling the kernel source, and the
# server's --device cuda start-up check; then kernels/examples/cuda_bench.rs:
# pinned host-to-device bandwidth, expert-FFN products, attention decode, and
# how much of an expert copy hides behind compute.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
FAILED=0
MODE=build
DIR=""
case "${1:-}" in
  --prebuild) MODE=prebuild; DIR=${2:?--prebuild needs a directory} ;;
  --prebuilt) MODE=prebuilt; DIR=${2:?--prebuilt needs a directory} ;;
  "") ;;
  *) echo "usage: $0 [--prebuild DIR | --prebuilt DIR]"; exit 2 ;;
esac

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
[ "$MODE" = prebuild ] || setup_libs

# --- build (or locate prebuilt binaries)
KTEST=""; KLIB=""; SDEV=""; SBIN=""; BENCH=""
find_exe() { sed -n "s|.*Executable $1 (\(.*\))|\1|p" | head -1; }
if [ "$MODE" = prebuilt ]; then
  KTEST=$DIR/cuda_vs_cpu; KLIB=$DIR/moe_kernels_lib; SDEV=$DIR/server_device; SBIN=$DIR/moe-serve; BENCH=$DIR/cuda_bench
else
  command -v cargo >/dev/null || { echo "cargo not found: build elsewhere with --prebuild DIR and run with --prebuilt DIR"; exit 1; }
  section "build with --features cuda (offline)"
  LOG=$(mktemp)
  if ! timeout 240 cargo test --offline -p moe-kernels --features cuda --no-run >"$LOG" 2>&1; then
    tail -30 "$LOG"; echo "BUILD FAILED (moe-kernels)"; exit 1
  fi
  KTEST=$(find_exe "tests/cuda_vs_cpu.rs" <"$LOG"); KLIB=$(find_exe "unittests src/lib.rs" <"$LOG")
  if ! timeout 240 cargo test --offline -p moe-server --features cuda --test device --no-run >"$LOG" 2>&1; then
    tail -30 "$LOG"; echo "BUILD FAILED (moe-server)"; exit 1
  fi
  SDEV=$(find_exe "tests/device.rs" <"$LOG"); SBIN=target/debug/moe-serve
  if ! timeout 120 cargo build --offline -p moe-kernels --features cuda --example cuda_bench >"$LOG" 2>&1; then
    tail -30 "$LOG"; echo "BUILD FAILED (cuda_bench)"; exit 1
  fi
  BENCH=target/debug/examples/cuda_bench
  echo "built in $(elapsed)s"
  if [ "$MODE" = prebuild ]; then
    mkdir -p "$DIR"
    cp "$KTEST" "$DIR/cuda_vs_cpu"; cp "$KLIB" "$DIR/moe_kernels_lib"; cp "$SDEV" "$DIR/server_device"
    cp "$SBIN" "$DIR/moe-serve"; cp "$BENCH" "$DIR/cuda_bench"
    echo "binaries in $DIR; run: scripts/gpu-check.sh --prebuilt $DIR"
    exit 0
  fi
fi

# --- tests
section "NVRTC compiles every kernel; missing-driver path"
timeout 60 "$KLIB" --nocapture --test-threads=1 cuda:: || FAILED=1

section "kernels vs CPU on the GPU"
OUT=$(mktemp)
timeout 180 "$KTEST" --nocapture --test-threads=1 2>&1 | tee "$OUT"
[ "${PIPESTATUS[0]}" -eq 0 ] || FAILED=1
if grep -q "SKIPPED (no usable GPU)" "$OUT"; then
  echo "NO USABLE GPU: the comparisons above were skipped, so nothing was checked on a GPU"
  FAILED=1
fi

section "moe-serve --device cuda"
if [ "$MODE" = prebuilt ]; then
  timeout 30 "$SBIN" generate --prompt hello --max-tokens 1 --device cuda; echo "(exit $?; expected: a clear error)"
else
  timeout 60 "$SDEV" --nocapture || FAILED=1
  timeout 30 "$SBIN" generate --prompt hello --max-tokens 1 --device cuda; echo "(exit $?; expected: a clear error)"
fi

# --- benchmark
section "benchmark (kernels/examples/cuda_bench.rs)"
timeout 120 "$BENCH" || FAILED=1

section "not implemented on the GPU yet"
cat <<'EOF'
- the model forward pass on the GPU: the kernels above exist and are tested, but moe-model does not call them
  yet, so there are no model fidelity fixtures on the GPU, no greedy-token comparison with the CPU run, and no
  decode/prefill tokens/s of the larger random-weight config (resident, 25% or 50% expert budget);
- sampling on the device beyond greedy argmax (temperature/top-k/top-p run on the CPU);
- the expert cache's policies and predictor driving the GPU slot pool (the pool moves bytes when told; the
  engine's moe-offload cache does not yet tell it); metrics for the GPU tier;
- routing statistics copied back asynchronously (route_topk leaves ids and weights on the device; nothing
  consumes them there yet).
EOF

section "done"
echo "total $(elapsed)s; $( [ $FAILED -eq 0 ] && echo PASS || echo FAIL )"
exit $FAILED
