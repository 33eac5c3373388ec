#!/usr/bin/env python3
"""Writes a random-weight transformers checkpoint of gpt-oss-20b's shape with its
experts in MXFP4, as the release stores them (`*_blocks` / `*_scales`), for the
decode-speed comparison with llama.cpp (whose converter reads such a checkpoint).

Shape: 24 layers, hidden 2880, 64 query and 8 key/value heads of 64, 32 experts
of width 2880, top-4, sliding window 128 on every other layer, YaRN (factor 32),
attention sinks and biases; experts MXFP4 (random codes, every block's exponent
2^-7), everything else bf16. One departure from the release: the vocabulary is
the built-in model's 2048 tokens (its tokenizer is copied), so the embedding and
output matrices are 1.1 GB smaller than the release's 201088 rows make them.
About 11.6 GB: check free disk first, delete it after.

usage: make_gpt_oss_hf.py OUT_DIR [--layers N] [--seed N]
needs: numpy
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, TOP_K, FFN = 2880, 64, 8, 64, 32, 4, 2880


def save_safetensors(path, tensors):
    """A safetensors file (bf16 tensors given as uint16 bits are labelled BF16)."""
    header, offset, order = {}, 0, []
    for name, arr in tensors.items():
        dtype = {np.uint16: "BF16", np.uint8: "U8"}[arr.dtype.type]
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        order.append(arr)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for arr in order:
            f.write(np.ascontiguousarray(arr).tobytes())


def bf16(rng, shape, std):
    """Random bf16 values (as uint16 bits, numpy has no bf16) of about `std`."""
    x = (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    need = a.layers * 485_000_000
    free = shutil.disk_usage(a.out.parent).free
    print(f"writing about {need / 1e9:.1f} GB to {a.out} ({free / 1e9:.1f} GB free)", file=sys.stderr)
    if need > free - 2 * 2**30:
        sys.exit("not enough free disk")
    a.out.mkdir(parents=True, exist_ok=True)
    builtin = ROOT / "models/tiny-shakespeare-moe"
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(builtin / f, a.out / f)
    vocab = 2048
    cfg = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": vocab,
        "hidden_size": HIDDEN, "num_hidden_layers": a.layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "intermediate_size": FFN,
        "num_local_experts": EXPERTS, "num_experts_per_tok": TOP_K, "experts_per_token": TOP_K,
        "sliding_window": 128, "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                                               for i in range(a.layers)],
        "attention_bias": True, "hidden_act": "silu", "swiglu_limit": 7.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072, "rope_theta": 150000,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 4096},
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
    }
    (a.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    rng = np.random.default_rng(a.seed)
    weight_map, shard = {}, 0

    def write(tensors):
        nonlocal shard
        shard += 1
        name = f"model-{shard:05d}.safetensors"
        save_safetensors(a.out / name, tensors)
        weight_map.update({k: name for k in tensors})
        print(f"  {name}", file=sys.stderr)

    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    write({"model.embed_tokens.weight": bf16(rng, (vocab, HIDDEN), 1.0),
           "lm_head.weight": bf16(rng, (vocab, HIDDEN), 0.02),
           "model.norm.weight": np.full(HIDDEN, 0x3F80, np.uint16)})
    for l in range(a.layers):
        p = f"model.layers.{l}."
        g = HIDDEN // 32
        t = {
            p + "input_layernorm.weight": np.full(HIDDEN, 0x3F80, np.uint16),
            p + "post_attention_layernorm.weight": np.full(HIDDEN, 0x3F80, np.uint16),
            p + "self_attn.q_proj.weight": bf16(rng, (q, HIDDEN), 0.02),
            p + "self_attn.q_proj.bias": bf16(rng, (q,), 0.02),
            p + "self_attn.k_proj.weight": bf16(rng, (kv, HIDDEN), 0.02),
            p + "self_attn.k_proj.bias": bf16(rng, (kv,), 0.02),
            p + "self_attn.v_proj.weight": bf16(rng, (kv, HIDDEN), 0.02),
            p + "self_attn.v_proj.bias": bf16(rng, (kv,), 0.02),
            p + "self_attn.o_proj.weight": bf16(rng, (HIDDEN, q), 0.02),
            p + "self_attn.o_proj.bias": bf16(rng, (HIDDEN,), 0.02),
            p + "self_attn.sinks": bf16(rng, (HEADS,), 1.0),
            p + "mlp.router.weight": bf16(rng, (EXPERTS, HIDDEN), 0.02),
            p + "mlp.router.bias": bf16(rng, (EXPERTS,), 0.02),
            p + "mlp.experts.gate_up_proj_blocks": np.frombuffer(rng.bytes(EXPERTS * 2 * FFN * g * 16), np.uint8)
            .reshape(EXPERTS, 2 * FFN, g, 16),
            p + "mlp.experts.gate_up_proj_scales": np.full((EXPERTS, 2 * FFN, g), 120, np.uint8),
            p + "mlp.experts.gate_up_proj_bias": bf16(rng, (EXPERTS, 2 * FFN), 0.02),
            p + "mlp.experts.down_proj_blocks": np.frombuffer(rng.bytes(EXPERTS * HIDDEN * (FFN // 32) * 16), np.uint8)
            .reshape(EXPERTS, HIDDEN, FFN // 32, 16),
            p + "mlp.experts.down_proj_scales": np.full((EXPERTS, HIDDEN, FFN // 32), 120, np.uint8),
            p + "mlp.experts.down_proj_bias": bf16(rng, (EXPERTS, HIDDEN), 0.02),
        }
        write(t)
    total = sum(f.stat().st_size for f in a.out.glob("model-*.safetensors"))
    (a.out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    print(f"wrote {a.out} ({total / 1e9:.2f} GB)", file=sys.stderr)


if __name__ == "__main__":
    main()
