#!/usr/bin/env bash
# Side by side with llama.cpp on the same GGUF files, same threads, alternated
# (llama-bench, moe-serve bench, llama-bench, ...) so drift in machine load
# hits both: prefill of 128 tokens and decode of 64 at batch 1, best of 3 each.
#
# Files (made once in $WORK, default /tmp/moe-gguf-bench, about 5 GB; delete
# after): the built-in model and the 1.19B bench shape (random weights, the
# LARGE_CONFIG of bench/src/throughput.rs, made with transformers), each
# converted to BF16 by llama.cpp's convert_hf_to_gguf.py and quantized to
# Q8_0 and Q4_K_M by llama-quantize; and on request (FILES=deepseek-v2-lite-q8_0.gguf) a
# random DeepSeek-V2-Lite-shape Q8_0 file (16 GB, scripts/make_deepseek_gguf.py). Only the
# files FILES names are made.
#
# Usage: scripts/llama_cpp_bench.sh [ROUNDS] [THREADS]
# Environment: LLAMA_BIN (llama.cpp build's bin, default /work/llama/build/bin),
# LLAMA_TREE (its source tree), CONVERT_PY (a Python with torch, transformers
# and numpy for the converter), MOE_BIN (default target/release/moe-serve),
# WORK, FILES (a space-separated subset of the file names below), LLAMA_ARGS (more
# llama-bench flags, e.g. "--repack 0" to turn off its weight repacking).
# Build llama.cpp as ../shared/PERFORMANCE.md shows.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rounds=${1:-2}
threads=${2:-2}
bin=${LLAMA_BIN:-/work/llama/build/bin}
tree=${LLAMA_TREE:-/work/llama/src/llama_cpp_python-0.3.36/vendor/llama.cpp}
py=${CONVERT_PY:-/work/llama/venv/bin/python}
moe=${MOE_BIN:-$root/target/release/moe-serve}
work=${WORK:-/tmp/moe-gguf-bench}
mkdir -p "$work"

convert() { # HF_DIR OUT.gguf
    "$py" - "$tree" "$1" --outfile "$2" --outtype bf16 >/dev/null 2>&1 <<'PY'
import runpy, sys
tree = sys.argv.pop(1)
sys.path[:0] = [tree, tree + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv[0] = tree + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
PY
}

files=${FILES:-builtin-bf16.gguf builtin-q8_0.gguf builtin-q4_k_m.gguf large-bf16.gguf large-q8_0.gguf large-q4_k_m.gguf}
wants() { case " $files " in *" $1"*) return 0 ;; *) return 1 ;; esac; }

# DeepSeek-V2-Lite's shape, random Q8_0 (16 GB), written directly as llama.cpp lays it out
if wants deepseek-v2-lite-q8_0.gguf && [ ! -f "$work/deepseek-v2-lite-q8_0.gguf" ]; then
    PYTHONPATH="$tree/gguf-py" "$py" "$root/scripts/make_deepseek_gguf.py" "$work/deepseek-v2-lite-q8_0.gguf"
fi

if { wants large- || wants builtin-; } && [ ! -f "$work/large-hf/config.json" ]; then
    echo "making the 1.19B bench shape (random bf16 weights)..." >&2
    "$py" - "$root" "$work/large-hf" <<'PY'
import json, re, shutil, sys, torch
from transformers import MixtralConfig, MixtralForCausalLM
root, out = sys.argv[1], sys.argv[2]
src = open(root + "/bench/src/throughput.rs").read()
cfg = json.loads(re.search(r'LARGE_CONFIG: &str = r#"(.*?)"#', src, re.S).group(1))
cfg.pop("model_type")
torch.manual_seed(0)
model = MixtralForCausalLM(MixtralConfig(**cfg)).to(torch.bfloat16)
model.save_pretrained(out)
for f in ["tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(f"{root}/models/tiny-shakespeare-moe/{f}", out)
PY
fi
for m in builtin:$root/models/tiny-shakespeare-moe large:$work/large-hf; do
    name=${m%%:*}
    wants "$name-" || continue
    [ -f "$work/$name-bf16.gguf" ] || convert "${m#*:}" "$work/$name-bf16.gguf"
    for q in Q8_0 Q4_K_M; do
        lower=$(echo "$q" | tr 'A-Z' 'a-z')
        [ -f "$work/$name-$lower.gguf" ] ||
            "$bin/llama-quantize" "$work/$name-bf16.gguf" "$work/$name-$lower.gguf" "$q" >/dev/null 2>&1
    done
done

results=$work/results.txt
: >"$results"
for r in $(seq 1 "$rounds"); do
    for f in $files; do
        # llama.cpp: best sample of 3 for each test
        # shellcheck disable=SC2086 # LLAMA_ARGS is a list of flags
        "$bin/llama-bench" -m "$work/$f" -p 128 -n 64 -r 3 -t "$threads" ${LLAMA_ARGS:-} -o json 2>/dev/null | python3 -c '
import json, sys
for row in json.load(sys.stdin):
    kind = "prefill" if row["n_prompt"] else "decode"
    print(sys.argv[1], "llama.cpp", kind, max(row["samples_ts"]))
' "$f" | tee -a "$results"
        "$moe" --threads "$threads" bench --model "$work/$f" --no-large --no-batches \
            --prompt-tokens 128 --decode-tokens 64 --repeats 3 2>/dev/null | python3 -c '
import sys
row = [l for l in sys.stdin if l.startswith("| ") and "prefill" not in l][0].split("|")
print(sys.argv[1], "moe-serve", "prefill", float(row[3]))
print(sys.argv[1], "moe-serve", "decode", float(row[4]))
' "$f" | tee -a "$results"
    done
done
python3 - "$results" "$threads" "$rounds" <<'PY'
import collections, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    f, who, kind, tps = line.split()
    runs[(f, who, kind)].append(float(tps))
files = list(dict.fromkeys(k[0] for k in runs))
print(f"\n{sys.argv[3]} alternated rounds, {sys.argv[2]} threads; each cell: min-max over rounds of the best of 3\n")
print("| file | llama.cpp prefill | moe-serve prefill | ratio | llama.cpp decode | moe-serve decode | ratio |")
print("|---|---|---|---|---|---|---|")
span = lambda v: f"{min(v):.1f}-{max(v):.1f}"
for f in files:
    cells = [f]
    for kind in ["prefill", "decode"]:
        ll, us = runs[(f, "llama.cpp", kind)], runs[(f, "moe-serve", kind)]
        ratios = [u / l for u, l in zip(us, ll)]
        cells += [span(ll), span(us), f"{min(ratios):.2f}-{max(ratios):.2f}x"]
    print("| " + " | ".join(cells) + " |")
PY
