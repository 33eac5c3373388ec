#!/usr/bin/env python3
"""Writes a random-weight GGUF of a real large MoE shape, for the
larger-than-memory benchmark (`scripts/disk_bench.py`).

The default shape is Qwen3-30B-A3B's (48 layers, hidden 2048, 32 query heads
and 4 key/value heads of 128, 128 experts of width 768, top-8), every matrix
Q8_0: about 32 GB, more than the 24 GB of RAM of the machines here. Two
departures from the released model, both outside the experts: the vocabulary
is the built-in model's 2048 tokens (its tokenizer is copied from the
committed fixture `tests/fixtures/gguf/builtin-q8_0.gguf`), so the embedding
and output matrices are 0.25 GB smaller than the release's 151936 rows would
make them; and the weights are random.

Routing skew: a random model routes almost uniformly, which no trained MoE
does. The router rows are scaled so that popularity is skewed: in every layer
expert e's row is multiplied by `1 + SKEW * r_e`, where r_e in [0, 1] is the
expert's rank in a per-layer random permutation (so the popular experts
differ between layers). Both engines read the same file, so both see the same
skew. With the default SKEW of 1.5 about a quarter of the experts receive
about half of the choices (printed at the end, measured on random hidden
states).

Token-dependent routing: with every matrix at the usual initialisation scale
(0.02) the residual stream of a deep random network soon forgets the token,
and every token routes to the same few experts. The attention output and
expert down projections are therefore scaled down (`--out-std 0.001`,
`--down-std 0.004`; the other matrices 0.02, the embedding 1.0), so the
residual stream stays dominated by the token's embedding and each layer's
choice depends on the token, as a trained model's does.

Streaming: tensors are generated and written one at a time (at most one
layer's expert tensor, about 214 MB, in memory).

usage: make_large_gguf.py OUT.gguf [--layers N] [--skew S] [--seed N]
needs: numpy and the gguf package (pip install gguf numpy)
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np

try:
    import gguf
except ImportError:
    sys.exit("needs the gguf package: pip install gguf numpy")

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_FIXTURE = ROOT / "tests/fixtures/gguf/builtin-q8_0.gguf"

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 2048, 32, 4, 128
EXPERTS, TOP_K, EXPERT_FF = 128, 8, 768
Q8 = gguf.GGMLQuantizationType.Q8_0


def q8_0_bytes(rng, rows, cols, std):
    """Random Q8_0 blocks for a rows x cols matrix (numpy byte shape)."""
    blocks = rows * cols // 32
    data = np.frombuffer(rng.bytes(blocks * 34), dtype=np.uint8).reshape(blocks, 34).copy()
    # int8 values uniform in [-128, 127] have a standard deviation of about 73.9
    scale = np.array([std / 73.9], dtype=np.float16).view(np.uint8)
    data[:, 0] = scale[0]
    data[:, 1] = scale[1]
    return data.reshape(rows, cols // 32 * 34)


def check_disk(out, need):
    """Stops unless `need` bytes fit on `out`'s disk with 2 GiB to spare."""
    free = shutil.disk_usage(out.parent if str(out.parent) else ".").free
    print(f"writing {need / 1e9:.1f} GB to {out} ({free / 1e9:.1f} GB free)", file=sys.stderr)
    if need > free - 2 * 2**30:
        sys.exit(f"not enough free disk: {need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free (2 GiB kept spare)")


def copy_tokenizer(w):
    """Copies the built-in model's tokenizer (gpt2 byte-level BPE, 2048 tokens) from the
    committed fixture into GGUF writer `w`; returns the vocabulary size."""
    tok = gguf.GGUFReader(TOKENIZER_FIXTURE)
    for name, field in tok.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            sub = field.types[1]
            if sub == gguf.GGUFValueType.STRING:
                vals = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                vals = [field.parts[i].tolist()[0] for i in field.data]
            w.add_key_value(name, vals, kind, sub_type=sub)
        elif kind == gguf.GGUFValueType.STRING:
            w.add_key_value(name, bytes(field.parts[field.data[0]]).decode("utf-8"), kind)
        else:
            w.add_key_value(name, field.parts[field.data[0]].tolist()[0], kind)
    return len(tok.fields["tokenizer.ggml.tokens"].data)


def write_plan(w, out, plan):
    """Writes tensor infos then data of `plan`: (name, numpy value shape, raw Q8_0 type or
    None for f32, generator), one tensor in memory at a time."""
    for name, shape, raw, _ in plan:
        if raw is None:
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            byte_shape = (*shape[:-1], shape[-1] // 32 * 34)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=raw)
    w.write_header_to_file(out)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, _, _, gen in plan:
        w.write_tensor_data(gen())
        if name.endswith("ffn_down_exps.weight"):
            print(f"  {name}", file=sys.stderr)
    w.close()


def router(rng, skew):
    w = rng.standard_normal((EXPERTS, HIDDEN), dtype=np.float32) * 0.02
    rank = rng.permutation(EXPERTS) / (EXPERTS - 1)
    return w * (1.0 + skew * rank)[:, None].astype(np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--skew", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-std", type=float, default=0.001, help="attention output projections")
    ap.add_argument("--down-std", type=float, default=0.004, help="expert down projections")
    a = ap.parse_args()

    per_layer_experts = 3 * EXPERTS * EXPERT_FF * HIDDEN // 32 * 34
    per_layer_attn = (2 * HIDDEN * HEADS * HEAD_DIM + 2 * HIDDEN * KV_HEADS * HEAD_DIM) // 32 * 34
    check_disk(a.out, a.layers * (per_layer_experts + per_layer_attn) + 64 * 2**20)

    w = gguf.GGUFWriter(a.out, "qwen3moe")
    w.add_name("random Qwen3-30B-A3B shape (moe-serve disk benchmark)")
    w.add_block_count(a.layers)
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(6144)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(TOP_K)
    w.add_expert_feed_forward_length(EXPERT_FF)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    vocab = copy_tokenizer(w)

    # (name, numpy byte/value shape, dtype, raw type, generator)
    rng = np.random.default_rng(a.seed)
    plan = []
    ones = lambda n: (lambda: np.ones(n, dtype=np.float32))
    plan.append(("token_embd.weight", (vocab, HIDDEN), Q8, lambda: q8_0_bytes(rng, vocab, HIDDEN, 1.0)))
    plan.append(("output_norm.weight", (HIDDEN,), None, ones(HIDDEN)))
    plan.append(("output.weight", (vocab, HIDDEN), Q8, lambda: q8_0_bytes(rng, vocab, HIDDEN, 0.02)))
    for l in range(a.layers):
        b = f"blk.{l}."
        q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        plan += [
            (b + "attn_norm.weight", (HIDDEN,), None, ones(HIDDEN)),
            (b + "attn_q.weight", (q, HIDDEN), Q8, lambda q=q: q8_0_bytes(rng, q, HIDDEN, 0.02)),
            (b + "attn_k.weight", (kv, HIDDEN), Q8, lambda kv=kv: q8_0_bytes(rng, kv, HIDDEN, 0.02)),
            (b + "attn_v.weight", (kv, HIDDEN), Q8, lambda kv=kv: q8_0_bytes(rng, kv, HIDDEN, 0.02)),
            (b + "attn_output.weight", (HIDDEN, q), Q8, lambda q=q: q8_0_bytes(rng, HIDDEN, q, a.out_std)),
            (b + "attn_q_norm.weight", (HEAD_DIM,), None, ones(HEAD_DIM)),
            (b + "attn_k_norm.weight", (HEAD_DIM,), None, ones(HEAD_DIM)),
            (b + "ffn_norm.weight", (HIDDEN,), None, ones(HIDDEN)),
            (b + "ffn_gate_inp.weight", (EXPERTS, HIDDEN), None, lambda: router(rng, a.skew)),
        ]
        for part, rows, cols, std in [
            ("gate", EXPERT_FF, HIDDEN, 0.02),
            ("up", EXPERT_FF, HIDDEN, 0.02),
            ("down", HIDDEN, EXPERT_FF, a.down_std),
        ]:
            gen = lambda rows=rows, cols=cols, std=std: q8_0_bytes(rng, EXPERTS * rows, cols, std).reshape(
                EXPERTS, rows, cols // 32 * 34
            )
            plan.append((b + f"ffn_{part}_exps.weight", (EXPERTS, rows, cols), Q8, gen))

    write_plan(w, a.out, plan)
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 1e9:.2f} GB)", file=sys.stderr)

    # the skew, measured: share of choices taken by the most popular quarter
    r = router(np.random.default_rng(a.seed + 1), a.skew)
    h = np.random.default_rng(a.seed + 2).standard_normal((4096, HIDDEN), dtype=np.float32)
    top = np.argsort(-(h @ r.T), axis=1)[:, :TOP_K]
    counts = np.sort(np.bincount(top.ravel(), minlength=EXPERTS))[::-1]
    share = counts[: EXPERTS // 4].sum() / counts.sum()
    print(f"routing skew on random hidden states: the top quarter of experts takes {share:.0%} of choices")


if __name__ == "__main__":
    main()
