#!/usr/bin/env python3
"""GGUF fixtures and llama.cpp reference figures, for the GGUF tests.

Builds nothing itself: point it at a llama.cpp build and source tree (from the
PyPI source package llama-cpp-python, see scripts/llama_cpp_setup.sh) and at a
Python that can run its convert_hf_to_gguf.py (torch, transformers, numpy,
sentencepiece, gguf-py). Then:

    python scripts/llama_cpp_reference.py --tree T --bin B [--convert-python P]

1. converts each HF fixture in tests/fixtures (f32; mixtral_bf16 as bf16) to
   tests/fixtures/gguf/<fixture>.gguf (a byte-level tokenizer of 256 tokens
   is added first: the fixtures have none);
   and quantizes each with llama-quantize to Q8_0 and Q4_0
   (tests/fixtures/gguf/<fixture>-{q8_0,q4_0}.gguf);
2. converts the built-in model to BF16 (kept in a temporary directory) and
   quantizes it with llama-quantize to Q8_0, Q4_K_M and MXFP4_MOE (experts in
   MXFP4, the rest Q8_0) (tests/fixtures/gguf/builtin-{q8_0,q4_k_m,mxfp4_moe}.gguf);
3. records, for the built-in model at each of those types: llama-perplexity
   over the held-out tenth of ../shared/corpora/tinyshakespeare.txt (the
   split the model was trained with) and llama-simple's greedy continuations
   of a few prompts, into tests/fixtures/gguf/llama_cpp_reference.json.

The tokenizer's unknown pre-tokenizer hash is forced to 'gpt-2' (both are
byte-level BPE with GPT-2's split).
"""
import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ["mixtral", "mixtral_bf16", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3_fp8",
            "glm4_moe"]
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "KING HENRY VI:\nO God"]
CTX = 128
CHUNKS = 40
GEN_TOKENS = 32

FORCE_GPT2 = """
import runpy, sys
tree = sys.argv.pop(1)
sys.path.insert(0, tree)
sys.path.insert(1, tree + "/gguf-py")
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
# GLM's converter looks up GLM's own special tokens; the fixtures' byte tokenizer has none
import conversion.glm as glm
glm.Glm4MoeModel.set_vocab = lambda self: self._set_vocab_gpt2()
sys.argv[0] = tree + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def heldout_text(corpus: pathlib.Path) -> str:
    """The validation split of the built-in model: the text after the first
    newline at or after 90% of the characters (scripts/train_default_model.py)."""
    text = corpus.read_text()
    cut = text.index("\n", int(len(text) * 0.9)) + 1
    return text[cut:]


def byte_tokenizer(dir: pathlib.Path, python: str):
    """A 256-token byte-level BPE tokenizer (no merges) with <unk>, <s>, </s>
    at ids 0-2 as the fixtures' configs name them."""
    code = f"""
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast
alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
specials = ["<unk>", "<s>", "</s>"]
vocab = {{t: i for i, t in enumerate(specials + alphabet[: 256 - len(specials)])}}
tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.add_special_tokens(specials)
PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained("{dir}")
"""
    subprocess.run([python, "-c", code], check=True)


ALL_MOE = """
import glob, json, sys, numpy as np
from safetensors.numpy import load_file, save_file
src, dst = sys.argv[1], sys.argv[2]
cfg = json.load(open(src + "/config.json"))
dense = cfg["mlp_only_layers"]
cfg["mlp_only_layers"] = []
t = {}
for shard in sorted(glob.glob(src + "/*.safetensors")):
    if not shard.endswith("reference.safetensors"):
        t.update(load_file(shard))
rng = np.random.default_rng(15)
h, f, s, e = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"], cfg["num_experts"]
r = lambda *shape: (rng.standard_normal(shape) * 0.05).astype(np.float32)
for l in dense:
    p = f"model.layers.{l}.mlp."
    for k in ["gate_proj", "up_proj", "down_proj"]:
        del t[p + k + ".weight"]
    t[p + "gate.weight"] = r(e, h)
    for x in range(e):
        t[p + f"experts.{x}.gate_proj.weight"] = r(f, h)
        t[p + f"experts.{x}.up_proj.weight"] = r(f, h)
        t[p + f"experts.{x}.down_proj.weight"] = r(h, f)
    t[p + "shared_expert.gate_proj.weight"] = r(s, h)
    t[p + "shared_expert.up_proj.weight"] = r(s, h)
    t[p + "shared_expert.down_proj.weight"] = r(h, s)
    t[p + "shared_expert_gate.weight"] = r(1, h)
save_file(t, dst + "/model.safetensors", metadata={"format": "pt"})
json.dump(cfg, open(dst + "/config.json", "w"), indent=2)
"""


def all_moe_qwen2(python, src, dst):
    """llama.cpp's qwen2moe has no dense layers: a copy of the qwen2_moe
    fixture whose dense layer became an MoE layer (random experts)."""
    dst.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-c", ALL_MOE, str(src), str(dst)], check=True)
    shutil.copy(src / "generation_config.json", dst)


def convert(python, tree, src, out, outtype):
    subprocess.run([python, "-c", FORCE_GPT2, str(tree), str(src), "--outfile", str(out), "--outtype", outtype],
                   check=True, stdout=subprocess.DEVNULL)


def quantize(bin, src, dst, qtype, extra=()):
    subprocess.run([str(bin / "llama-quantize"), *extra, str(src), str(dst), qtype], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def perplexity(bin, model, text_file, threads):
    out = subprocess.run([str(bin / "llama-perplexity"), "-m", str(model), "-f", str(text_file), "-c", str(CTX),
                          "-b", str(CTX), "--chunks", str(CHUNKS), "-t", str(threads)],
                         check=True, capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if not m:
        sys.exit(f"no PPL in llama-perplexity's output for {model}:\n{out.stderr[-2000:]}")
    return float(m.group(1))


def continuation(bin, model, prompt, threads):
    out = subprocess.run([str(bin / "llama-simple"), "-m", str(model), "-n", str(GEN_TOKENS), prompt],
                         check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    # llama-simple prints the prompt's tokens (the bos token's text included)
    text = out.stdout.removeprefix("<s>")
    if not text.startswith(prompt):
        sys.exit(f"llama-simple's output does not start with the prompt: {text!r}")
    # ... and a newline after the last token
    return text[len(prompt):].removesuffix("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", required=True, type=pathlib.Path, help="llama.cpp source tree (vendor/llama.cpp)")
    ap.add_argument("--bin", required=True, type=pathlib.Path, help="its build's bin directory")
    ap.add_argument("--convert-python", default=sys.executable, help="a Python able to run convert_hf_to_gguf.py")
    ap.add_argument("--corpus", type=pathlib.Path, default=ROOT.parent / "shared/corpora/tinyshakespeare.txt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="convert only these fixtures (skips the built-in model's files)")
    args = ap.parse_args()
    out = ROOT / "tests/fixtures/gguf"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for name in FIXTURES:
            if args.only is not None and name not in args.only:
                continue
            src = tmp / name
            if name == "qwen2_moe":
                # kept beside its GGUF: the loader-equivalence test reads both
                hf = out / "qwen2_moe_all_moe"
                all_moe_qwen2(args.convert_python, ROOT / "tests/fixtures" / name, hf)
                shutil.copytree(hf, src)
            else:
                shutil.copytree(ROOT / "tests/fixtures" / name, src)
            byte_tokenizer(src, args.convert_python)
            convert(args.convert_python, args.tree, src, out / f"{name}.gguf", "bf16" if name.endswith("bf16") else "f32")
            # llama.cpp loads a deepseek2 file without a query low rank only at
            # DeepSeek-V2-Lite's 26 or 27 layers, so llama-quantize cannot read this one
            # DeepSeek's 16- and 24-wide matrices (attn_k_b, attn_q_b) kept f32 rather than
            # llama-quantize's F16 fallback, so the file matches our own quantizer bit for bit
            # (this tiny random network's grouped routing flips on F16 rounding)
            keep = ["--tensor-type", "attn_k_b=f32", "--tensor-type", "attn_q_b=f32"] if "deepseek" in name else []
            for q in [] if name == "deepseek_v2" else ["Q8_0", "Q4_0"]:
                quantize(args.bin, out / f"{name}.gguf", out / f"{name}-{q.lower()}.gguf", q, keep)
            print("converted", name)
        if args.only is not None:
            return
        bf16 = tmp / "builtin-bf16.gguf"
        convert(args.convert_python, args.tree, ROOT / "models/tiny-shakespeare-moe", bf16, "bf16")
        files = {"builtin-bf16.gguf": bf16}
        for q in ["Q8_0", "Q4_K_M", "MXFP4_MOE"]:
            dst = out / f"builtin-{q.lower()}.gguf"
            quantize(args.bin, bf16, dst, q)
            files[dst.name] = dst
        text_file = tmp / "heldout.txt"
        text_file.write_text(heldout_text(args.corpus))
        reference = {
            "llama_cpp": "llama-cpp-python 0.3.36 (vendor/llama.cpp)",
            "perplexity": {"text": "held-out tenth of tinyshakespeare.txt", "ctx": CTX, "chunks": CHUNKS},
            "generation": {"tokens": GEN_TOKENS, "sampler": "greedy (llama-simple)"},
            "files": {},
        }
        for name, path in files.items():
            ppl = perplexity(args.bin, path, text_file, args.threads)
            conts = [{"prompt": p, "continuation": continuation(args.bin, path, p, args.threads)} for p in PROMPTS]
            reference["files"][name] = {"ppl": ppl, "continuations": conts}
            print(name, "PPL", ppl)
        (out / "llama_cpp_reference.json").write_text(json.dumps(reference, indent=2) + "\n")


if __name__ == "__main__":
    main()
