#!/usr/bin/env python3
"""Writes a random-weight GGUF of DeepSeek-V2-Lite's shape (`deepseek2`, as llama.cpp's
converter lays it out), every matrix Q8_0: about 16 GB. For decode and prefill speed side
by side with llama.cpp (`scripts/llama_cpp_bench.sh` with FILES naming it, or by hand).

The shape (the hub config of deepseek-ai/DeepSeek-V2-Lite): 27 layers, hidden 2048, 16
heads of latent attention (kv_lora_rank 512, no query low rank, 128 + 64 rotary query/key
dims, values 128), layer 0 dense (10944), then 64 routed experts of 1408 (top-6, softmax,
greedy) and 2 shared experts; YaRN factor 40 over 4096 positions with mscale_all_dim
0.707. The latent up-projection is stored as llama.cpp's converter writes it: per head
`attn_k_b` (the key part, transposed) and `attn_v_b`. Departures from the release: the
vocabulary is the built-in model's 2048 tokens (its tokenizer, copied from the committed
fixture), not 102400 (0.4 GB less embedding and output), and the weights are random, with
the attention output and expert down projections scaled down so routing stays
token-dependent (see make_large_gguf.py).

usage: make_deepseek_gguf.py OUT.gguf [--layers N] [--seed N]
needs: numpy and the gguf package
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_large_gguf import Q8, check_disk, copy_tokenizer, gguf, q8_0_bytes, write_plan  # noqa: E402

HIDDEN, HEADS, DENSE_FF = 2048, 16, 10944
RANK, NOPE, ROPE, V = 512, 128, 64, 128
EXPERTS, TOP_K, EXPERT_FF, SHARED = 64, 6, 1408, 2


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    q8 = lambda rows, cols: rows * cols // 32 * 34
    per_moe = 3 * EXPERTS * q8(EXPERT_FF, HIDDEN) + 3 * q8(SHARED * EXPERT_FF, HIDDEN)
    per_attn = q8(HEADS * (NOPE + ROPE), HIDDEN) + q8(RANK + ROPE, HIDDEN) + 2 * q8(HEADS * RANK, 128) + q8(HIDDEN, HEADS * V)
    check_disk(a.out, (a.layers - 1) * per_moe + 3 * q8(DENSE_FF, HIDDEN) + a.layers * per_attn + 64 * 2**20)

    w = gguf.GGUFWriter(a.out, "deepseek2")
    w.add_name("random DeepSeek-V2-Lite shape (moe-serve benchmark)")
    w.add_block_count(a.layers)
    w.add_context_length(163840)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(DENSE_FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(1)
    w.add_key_length(RANK + ROPE)
    w.add_value_length(RANK)
    w.add_key_length_mla(NOPE + ROPE)
    w.add_value_length_mla(V)
    w.add_kv_lora_rank(RANK)
    w.add_rope_dimension_count(ROPE)
    w.add_rope_freq_base(10000.0)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(40.0)
    w.add_rope_scaling_orig_ctx_len(4096)
    w.add_rope_scaling_yarn_log_mul(0.1 * 0.707)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_leading_dense_block_count(1)
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(TOP_K)
    w.add_expert_shared_count(SHARED)
    w.add_expert_feed_forward_length(EXPERT_FF)
    w.add_expert_weights_scale(1.0)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    vocab = copy_tokenizer(w)
    w.add_vocab_size(vocab)

    rng = np.random.default_rng(a.seed)
    ones = lambda n: (lambda: np.ones(n, dtype=np.float32))
    mat = lambda rows, cols, std: (lambda: q8_0_bytes(rng, rows, cols, std))
    plan = [
        ("token_embd.weight", (vocab, HIDDEN), Q8, mat(vocab, HIDDEN, 1.0)),
        ("output_norm.weight", (HIDDEN,), None, ones(HIDDEN)),
        ("output.weight", (vocab, HIDDEN), Q8, mat(vocab, HIDDEN, 0.02)),
    ]
    for l in range(a.layers):
        b = f"blk.{l}."
        plan += [
            (b + "attn_norm.weight", (HIDDEN,), None, ones(HIDDEN)),
            (b + "attn_q.weight", (HEADS * (NOPE + ROPE), HIDDEN), Q8, mat(HEADS * (NOPE + ROPE), HIDDEN, 0.02)),
            (b + "attn_kv_a_mqa.weight", (RANK + ROPE, HIDDEN), Q8, mat(RANK + ROPE, HIDDEN, 0.02)),
            (b + "attn_kv_a_norm.weight", (RANK,), None, ones(RANK)),
            (b + "attn_k_b.weight", (HEADS, RANK, NOPE), Q8,
             lambda: q8_0_bytes(rng, HEADS * RANK, NOPE, 0.02).reshape(HEADS, RANK, NOPE // 32 * 34)),
            (b + "attn_v_b.weight", (HEADS, V, RANK), Q8,
             lambda: q8_0_bytes(rng, HEADS * V, RANK, 0.02).reshape(HEADS, V, RANK // 32 * 34)),
            (b + "attn_output.weight", (HIDDEN, HEADS * V), Q8, mat(HIDDEN, HEADS * V, 0.001)),
            (b + "ffn_norm.weight", (HIDDEN,), None, ones(HIDDEN)),
        ]
        if l == 0:
            plan += [
                (b + "ffn_gate.weight", (DENSE_FF, HIDDEN), Q8, mat(DENSE_FF, HIDDEN, 0.02)),
                (b + "ffn_up.weight", (DENSE_FF, HIDDEN), Q8, mat(DENSE_FF, HIDDEN, 0.02)),
                (b + "ffn_down.weight", (HIDDEN, DENSE_FF), Q8, mat(HIDDEN, DENSE_FF, 0.004)),
            ]
            continue
        plan.append((b + "ffn_gate_inp.weight", (EXPERTS, HIDDEN), None,
                     lambda: rng.standard_normal((EXPERTS, HIDDEN), dtype=np.float32) * 0.02))
        for part, rows, cols, std in [("gate", EXPERT_FF, HIDDEN, 0.02), ("up", EXPERT_FF, HIDDEN, 0.02),
                                      ("down", HIDDEN, EXPERT_FF, 0.004)]:
            gen = lambda rows=rows, cols=cols, std=std: q8_0_bytes(rng, EXPERTS * rows, cols, std).reshape(
                EXPERTS, rows, cols // 32 * 34)
            plan.append((b + f"ffn_{part}_exps.weight", (EXPERTS, rows, cols), Q8, gen))
            s_rows, s_cols = (SHARED * EXPERT_FF, HIDDEN) if part != "down" else (HIDDEN, SHARED * EXPERT_FF)
            plan.append((b + f"ffn_{part}_shexp.weight", (s_rows, s_cols), Q8, mat(s_rows, s_cols, std)))
    write_plan(w, a.out, plan)
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 1e9:.2f} GB)", file=sys.stderr)


if __name__ == "__main__":
    main()
