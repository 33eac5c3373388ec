#!/usr/bin/env python3
"""GGUF tokenizer fixtures: the two tokenizer kinds beyond gpt2/"gpt-2".

model/src/gguf/tokenizer.rs rebuilds a tokenizer from a GGUF's
`tokenizer.ggml.*` metadata. This script makes the fixtures that test two of
its paths against llama.cpp itself. It writes, under
tests/fixtures/gguf/tokenizers/:

  spm.gguf        a tiny random MixtralForCausalLM (hidden 64, 2 layers,
                  4 experts top-2, intermediate 32, 4 heads / 2 kv heads, f32)
                  whose tokenizer is a SentencePiece BPE model with byte
                  fallback (vocab 512, <unk>=0 <s>=1 </s>=2, Llama-2 style
                  trainer settings), trained with the `sentencepiece` package
                  on the first 200 KB of tinyshakespeare and saved as a HF
                  LlamaTokenizer (tokenizer.model). Converted with llama.cpp's
                  convert_hf_to_gguf.py: tokenizer.ggml.model = "llama", with
                  scores and token types.
  qwen2.gguf      a tiny random Qwen3MoeForCausalLM (same sizes, head_dim 16,
                  norm_topk_prob) whose tokenizer is a byte-level BPE (509
                  trained tokens + <|endoftext|>, <|im_start|>, <|im_end|>),
                  trained with `tokenizers` on the same text with Qwen2's
                  pre-tokenizer (Split on Qwen2's regex, Isolated, then
                  ByteLevel without its regex), saved as a Qwen2TokenizerFast.
                  Converted with convert_hf_to_gguf.py, forcing
                  tokenizer.ggml.pre = "qwen2" (the vocabulary's hash is
                  unknown to llama.cpp, as in scripts/llama_cpp_reference.py).
  reference.json  for each GGUF, test texts with the ids llama.cpp's
                  `llama-tokenize` gives (BOS as the GGUF asks), the ids of
                  the HF tokenizer the GGUF was made from, the texts where the
                  two differ, and the provenance (versions, seeds, hashes).

Needs a llama.cpp source tree (for convert_hf_to_gguf.py and gguf-py) and its
build with the `llama-tokenize` target built, e.g.

    nice -n 15 cmake --build /work/llama/build --target llama-tokenize -j1

and a Python that can run the tree's converter: torch, transformers (the
tree's pin, 4.57.x), sentencepiece, tokenizers, safetensors, numpy, gguf-py.
Run it from anywhere with that Python, e.g.

    nice -n 10 /work/llama/venv/bin/python scripts/gguf_tokenizer_fixtures.py \\
        --tree /work/llama/src/llama_cpp_python-0.3.36/vendor/llama.cpp \\
        --bin /work/llama/build/bin

(those two paths are the defaults; --corpus defaults to
../shared/corpora/tinyshakespeare.txt beside the repository, --out to
tests/fixtures/gguf/tokenizers). Everything is seeded and single-threaded:
a rerun with the same versions gives byte-identical files (the GGUFs' sha256
are recorded in reference.json).
"""
import argparse
import hashlib
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile

# single-threaded, deterministic training and initialisation
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_TREE = "/work/llama/src/llama_cpp_python-0.3.36/vendor/llama.cpp"
DEFAULT_BIN = "/work/llama/build/bin"

CORPUS_BYTES = 200 * 1024  # the first 200 KB, cut back to a line end
SEED = 1234  # torch weights
SPM_SEED = 1234  # sentencepiece.set_random_generator_seed (its BPE trainer is deterministic anyway)
VOCAB = 512
# the tiny models' common shape (random weights; only the tokenizers matter)
TINY_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TOKENIZE_FLAGS = ["--ids", "--stdin", "--no-escape", "--log-disable"]

# (text, what it covers)
TEXTS = [
    ("Hello world", "plain words"),
    ("The quick brown fox jumps over the lazy dog.", "plain sentence"),
    ("ROMEO:\nBut soft, what light through yonder window breaks?", "in-domain text with a newline"),
    ("  two leading spaces", "leading spaces"),
    ("trailing spaces   ", "trailing spaces"),
    ("multiple   spaces \t and a tab", "runs of spaces, a tab"),
    ("line one\nline two\n\nline four\n", "newlines and \\n\\n, trailing newline"),
    ("12345 and 3.14", "digits"),
    ("Hello, world! (yes) -- \"quoted\"; ok? [a]{b}", "punctuation"),
    ("I don't know; I'LL see. We're sure they've gone", "contractions, upper case"),
    ("café naïve résumé", "accented letters"),
    ("日本語のテキスト", "CJK"),
    ("emoji \U0001F642 party \U0001F389", "emoji (byte fallback in SPM)"),
    ("", "empty string"),
]
EXTRA = {
    "spm": [],
    "qwen2": [("<|im_start|>user\nhi there<|im_end|>\n", "special tokens (parsed: llama-tokenize's default)")],
}


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def corpus_head(corpus: pathlib.Path) -> str:
    data = corpus.read_bytes()[:CORPUS_BYTES]
    return data[: data.rindex(b"\n") + 1].decode("utf-8")


# --- the two HF models ------------------------------------------------------


def make_spm(text: str, d: pathlib.Path, work: pathlib.Path):
    import sentencepiece as spm
    import torch
    from transformers import LlamaTokenizer, MixtralConfig, MixtralForCausalLM

    spm.set_random_generator_seed(SPM_SEED)
    train_file = work / "spm_train.txt"
    train_file.write_text(text)
    prefix = work / "spm"
    spm.SentencePieceTrainer.train(
        input=str(train_file),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=VOCAB,
        byte_fallback=True,
        character_coverage=1.0,
        # Llama-2's trainer settings
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        split_by_unicode_script=True,
        split_by_number=True,
        split_by_whitespace=True,
        max_sentence_length=4192,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # deterministic
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    d.mkdir(parents=True)
    tok = LlamaTokenizer(
        vocab_file=str(prefix) + ".model", legacy=True, add_bos_token=True, add_eos_token=False, add_prefix_space=True
    )
    assert len(tok) == VOCAB, len(tok)
    tok.save_pretrained(d)

    torch.manual_seed(SEED)
    cfg = MixtralConfig(**TINY_SHAPE, num_local_experts=4, bos_token_id=1, eos_token_id=2)
    MixtralForCausalLM(cfg).to(torch.float32).save_pretrained(d, safe_serialization=True)


def make_qwen2(text: str, d: pathlib.Path):
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import Qwen2TokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(QWEN_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # paragraphs with their newlines, so that newline merges can be learnt
    paragraphs = [p + "\n\n" for p in text.split("\n\n") if p]
    tok.train_from_iterator(paragraphs, trainer)
    assert tok.get_vocab_size() == VOCAB - len(QWEN_SPECIALS), tok.get_vocab_size()
    tok.add_special_tokens(QWEN_SPECIALS)  # ids 509..511, at the end as in Qwen's vocabularies
    fast = Qwen2TokenizerFast(
        tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    assert len(fast) == VOCAB, len(fast)
    d.mkdir(parents=True)
    fast.save_pretrained(d)
    eot = fast.convert_tokens_to_ids("<|endoftext|>")

    torch.manual_seed(SEED)
    cfg = Qwen3MoeConfig(
        **TINY_SHAPE,
        moe_intermediate_size=32,
        head_dim=16,
        num_experts=4,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    Qwen3MoeForCausalLM(cfg).to(torch.float32).save_pretrained(d, safe_serialization=True)


# --- llama.cpp --------------------------------------------------------------

CONVERT = """
import os, runpy, sys
tree = sys.argv.pop(1)
sys.path.insert(0, tree)
sys.path.insert(1, tree + "/gguf-py")
force = os.environ.get("FORCE_PRE")
if force:
    import conversion.base as base
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: force
sys.argv[0] = tree + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(python: str, tree: pathlib.Path, hf: pathlib.Path, out: pathlib.Path, name: str, force_pre=None):
    env = dict(os.environ)
    env.pop("FORCE_PRE", None)
    if force_pre:
        env["FORCE_PRE"] = force_pre
    cmd = [python, "-c", CONVERT, str(tree), str(hf), "--outfile", str(out), "--outtype", "f32", "--model-name", name]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"conversion of {hf} failed:\n{r.stdout}\n{r.stderr}")


def llama_tokenize(binary: pathlib.Path, gguf: pathlib.Path, text: str) -> list:
    r = subprocess.run([str(binary), "-m", str(gguf), *TOKENIZE_FLAGS], input=text.encode("utf-8"), capture_output=True)
    if r.returncode != 0:
        sys.exit(f"llama-tokenize failed on {text!r}:\n{r.stderr.decode(errors='replace')}")
    lines = [l for l in r.stdout.decode().splitlines() if l.startswith("[")]
    assert len(lines) == 1, r.stdout
    return json.loads(lines[0])


def gguf_meta(tree: pathlib.Path, path: pathlib.Path) -> dict:
    sys.path.insert(0, str(tree / "gguf-py"))
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    keys = [
        "general.architecture",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token",
        "tokenizer.ggml.add_space_prefix",
    ]
    out = {}
    for k in keys:
        f = r.get_field(k)
        if f is not None:
            v = f.contents()
            out[k] = v
    for k in ["tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"]:
        f = r.get_field(k)
        out[k.replace("tokenizer.ggml.", "n_")] = len(f.data) if f is not None else None
    return out


# --- main -------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=os.environ.get("LLAMA_TREE", DEFAULT_TREE), help="llama.cpp source tree")
    ap.add_argument("--bin", default=DEFAULT_BIN, help="llama.cpp build's bin folder (with llama-tokenize)")
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared/corpora/tinyshakespeare.txt"))
    ap.add_argument("--out", default=str(ROOT / "tests/fixtures/gguf/tokenizers"))
    ap.add_argument("--convert-python", default=sys.executable, help="Python that runs convert_hf_to_gguf.py")
    a = ap.parse_args()
    tree, out, corpus = pathlib.Path(a.tree), pathlib.Path(a.out), pathlib.Path(a.corpus)
    tokenize_bin = pathlib.Path(a.bin) / "llama-tokenize"
    if not tokenize_bin.is_file():
        sys.exit(f"{tokenize_bin} is missing: cmake --build <build> --target llama-tokenize")

    import sentencepiece
    import tokenizers
    import torch
    import transformers
    from transformers import LlamaTokenizer, Qwen2TokenizerFast

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    text = corpus_head(corpus)
    out.mkdir(parents=True, exist_ok=True)

    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        # fixed folder names: the converter names the model after its folder
        spm_dir, qwen_dir = tmp / "tiny-mixtral-spm", tmp / "tiny-qwen3moe-qwen2"
        make_spm(text, spm_dir, tmp)
        make_qwen2(text, qwen_dir)
        convert(a.convert_python, tree, spm_dir, out / "spm.gguf", "tiny-mixtral-spm")
        convert(a.convert_python, tree, qwen_dir, out / "qwen2.gguf", "tiny-qwen3moe-qwen2", force_pre="qwen2")

        hf = {
            "spm": (LlamaTokenizer.from_pretrained(spm_dir), "LlamaTokenizer (slow: the sentencepiece library; legacy=True)"),
            "qwen2": (Qwen2TokenizerFast.from_pretrained(qwen_dir), "Qwen2TokenizerFast (tokenizer.json)"),
        }
        hf_files = {
            name: sorted(p.name for p in d.iterdir() if not p.name.endswith(".safetensors"))
            for name, d in [("spm", spm_dir), ("qwen2", qwen_dir)]
        }

        for name, file, expect_model, expect_pre in [
            ("spm", "spm.gguf", "llama", "default"),
            ("qwen2", "qwen2.gguf", "gpt2", "qwen2"),
        ]:
            path = out / file
            meta = gguf_meta(tree, path)
            assert meta["tokenizer.ggml.model"] == expect_model, meta
            assert meta["tokenizer.ggml.pre"] == expect_pre, meta
            size = path.stat().st_size
            assert size < 1 << 20, f"{file} is {size} bytes"
            tok, tok_desc = hf[name]
            cases, differ = [], []
            # both GGUFs say it explicitly (llama.cpp's default: true for llama, false for gpt2/qwen2)
            add_bos = bool(meta["tokenizer.ggml.add_bos_token"])
            bos = meta.get("tokenizer.ggml.bos_token_id")
            for i, (t, covers) in enumerate(TEXTS + EXTRA[name]):
                ids = llama_tokenize(tokenize_bin, path, t)
                hf_ids = tok(t, add_special_tokens=True)["input_ids"]
                assert not add_bos or ids[:1] == [bos], (t, ids)
                case = {"text": t, "covers": covers, "ids": ids, "add_bos": add_bos, "hf_ids": hf_ids}
                if ids != hf_ids:
                    case["hf_differs"] = True
                    differ.append(i)
                cases.append(case)
            models[name] = {
                "file": file,
                "bytes": size,
                "sha256": sha256(path),
                "architecture": meta.pop("general.architecture"),
                "gguf_tokenizer": meta,
                "hf_tokenizer": tok_desc,
                "hf_tokenizer_files": hf_files[name],
                "hf_encode": "tok(text, add_special_tokens=True)['input_ids']",
                "add_bos": add_bos,
                "cases": cases,
                "hf_differs": differ,
            }

    def git_head(p):
        try:
            return subprocess.run(["git", "-C", str(p), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    from importlib.metadata import version

    reference = {
        "about": (
            "Token ids llama.cpp's llama-tokenize gives for the tokenizers of spm.gguf (tokenizer.ggml.model=llama, "
            "SentencePiece BPE with byte fallback) and qwen2.gguf (gpt2 with pre qwen2), made by "
            "scripts/gguf_tokenizer_fixtures.py. 'ids' are llama.cpp's (BOS included when the GGUF asks for it; "
            "'add_bos' says whether it did); 'hf_ids' those of the HF tokenizer each GGUF was converted from. "
            "Cases whose hf_ids differ from ids carry hf_differs=true and are listed per model in 'hf_differs' "
            "(indices into 'cases'): llama.cpp's ids are the reference."
        ),
        "llama_tokenize": {
            "command": "llama-tokenize -m FILE.gguf " + " ".join(TOKENIZE_FLAGS) + " < text (UTF-8 bytes, verbatim)",
            "notes": "--ids prints ids only; --stdin + --no-escape pass the text's bytes verbatim; no --no-bos, so "
            "BOS is added exactly when the GGUF's vocabulary asks for it; special tokens are parsed "
            "(llama-tokenize's default, as HF does).",
        },
        "models": models,
        "provenance": {
            "script": "scripts/gguf_tokenizer_fixtures.py",
            "llama_cpp_commit": git_head(tree),
            "llama_cpp_tree": "llama-cpp-python 0.3.36 sdist, vendor/llama.cpp" if "0.3.36" in str(tree) else str(tree),
            "gguf_py": version("gguf"),
            "python": platform.python_version(),
            "sentencepiece": sentencepiece.__version__,
            "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "corpus": corpus.name,
            "corpus_sha256": sha256(corpus),
            "corpus_slice": f"the first {CORPUS_BYTES} bytes, cut back to the last newline: {len(text.encode())} bytes",
            "corpus_slice_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "torch_seed": SEED,
            "sentencepiece_random_generator_seed": SPM_SEED,
            "spm_trainer": "model_type=bpe vocab_size=512 byte_fallback character_coverage=1.0 split_digits "
            "allow_whitespace_only_pieces remove_extra_whitespaces=false normalization=identity add_dummy_prefix "
            "unk=0 bos=1 eos=2 pad=-1 input_sentence_size=0 shuffle_input_sentence=false num_threads=1",
            "bpe_trainer": "tokenizers BpeTrainer vocab_size=509 + 3 specials, ByteLevel initial alphabet, "
            "trained on the slice's paragraphs (newlines kept), pre-tokenizer Split(qwen2 regex, Isolated) + "
            "ByteLevel(use_regex=false)",
            "models": "MixtralForCausalLM / Qwen3MoeForCausalLM, hidden 64, 2 layers, 4 experts top-2, "
            "intermediate 32, 4 heads / 2 kv heads, random init (torch.manual_seed), f32, untied embeddings",
        },
    }
    (out / "reference.json").write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n")
    for name, m in models.items():
        print(f"{m['file']}: {m['bytes']} bytes, {len(m['cases'])} texts, hf differs on {m['hf_differs']}")


if __name__ == "__main__":
    main()
