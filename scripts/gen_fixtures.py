#!/usr/bin/env python3
"""Generate the numerical-fidelity fixtures used by the Rust tests (tests/fixtures/).

For each of six tiny random-weight MoE checkpoints this writes a directory with the
checkpoint exactly as transformers' `save_pretrained` produces it (config.json,
model.safetensors or shards + model.safetensors.index.json, generation_config.json)
plus `reference.safetensors`, holding outputs computed by transformers on CPU in
float32 (eval mode, eager attention, eager experts) from the checkpoint reloaded from
disk:

  input_ids          int64   [T]       T = 12 random token ids
  logits             float32 [T, V]    logits of one full-sequence forward
  router_logits.{l}  float32 [T, E]    router logits of MoE layer l (dense layers absent)
  topk_ids.{l}       int64   [T, K]    experts HF selected, in HF order (descending weight)
  topk_weights.{l}   float32 [T, K]    routing weights HF applied to those experts
  greedy_ids         int64   [16]      16 greedy tokens continuing input_ids
                                       (full forward + argmax per step; eos ignored)
  decode_logits      float32 [15, V]   logits after greedy tokens 1..15 (the decode steps)
  decode_topk_ids.{l}     int64   [15, K]   experts chosen for those 15 positions
  decode_topk_weights.{l} float32 [15, K]   their routing weights

The metadata of reference.safetensors records the generator seed and library versions.

Fixtures: mixtral (f32; config.json rewritten to the old hub form with top-level
rope_theta), mixtral_bf16 (bf16 weights, reference computed with weights upcast to f32),
qwen2_moe (shared expert, layer 2 dense, sharded checkpoint), qwen3_moe (q/k norm,
explicit head_dim != hidden/heads, norm_topk_prob), olmoe (q/k norm over the full
projection, norm_topk_prob False), qwen3_moe_yarn and mixtral_yarn (YaRN RoPE, bounds
truncated and not), gpt_oss (attention sinks and biases, sliding and full layers, YaRN,
biased top-k-softmax router, biased experts with interleaved gate/up, clamped SwiGLU), and
the same with bf16 weights (gpt_oss_bf16) and with MXFP4 experts (gpt_oss_mxfp4).

No near ties: for every position of the final greedy forward (which covers the input
and the generated tokens) and every MoE layer the gap between the K-th and (K+1)-th
largest router logit is >= --router-gap, and every argmax taken (logits rows and greedy
steps) beats the runner-up by >= --logit-gap. A seed that fails this is skipped and the
next one tried; the seed used is printed and stored.

How to run (CPU, one thread, ~1 minute):
  OMP_NUM_THREADS=1 python scripts/gen_fixtures.py --out tests/fixtures
"""

import argparse
import json
import os
import platform
import re
import shutil
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import safetensors
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

SEQ_LEN = 12
GREEDY_STEPS = 16
VOCAB = 256

# Settings shared by all fixtures: tiny, GQA (4 query heads, 2 key/value heads), top-2.
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    initializer_range=0.15,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)

# name -> (model class, config class, config kwargs, options)
# gpt-oss, tiny: a sliding layer (window 5 < SEQ_LEN) then a full one, YaRN as released,
# a SwiGLU clamp low enough to bite
GPT_OSS = dict(num_hidden_layers=2, num_local_experts=4, intermediate_size=32, head_dim=16,
               sliding_window=5, layer_types=["sliding_attention", "full_attention"],
               attention_bias=True, swiglu_limit=0.2, max_position_embeddings=131072,
               rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                "truncate": False, "original_max_position_embeddings": 4096,
                                "rope_theta": 150000.0},
               rms_norm_eps=1e-5)

# DeepSeek, tiny: latent attention (kv_lora_rank 32, 4 heads of 16 + 8 rotary query/key
# dims, values 16), 8 routed experts top-2 plus shared experts, layer 0 dense; every head
# expands its own keys, so num_key_value_heads equals the head count
DEEPSEEK = dict(num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8, moe_intermediate_size=32,
                intermediate_size=64, first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=16384)

FIXTURES = {
    # DeepSeek-V2-Lite's form: no query low rank, greedy softmax routing, two shared
    # experts, routed weights scaled; YaRN with equal mscale terms (cos/sin unscaled,
    # the softmax scale corrected by mscale(4, 0.707)^2)
    "deepseek_v2": (
        DeepseekV2ForCausalLM, DeepseekV2Config,
        dict(DEEPSEEK, q_lora_rank=None, topk_method="greedy", n_shared_experts=2, routed_scaling_factor=1.5,
             rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                              "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
                              "rope_theta": 10000.0}),
        dict(save_dtype=torch.float32, byte_tokenizer=True),
    ),
    # DeepSeek-V2's form: a low-rank query with its norm, group-limited greedy routing
    # (2 groups of 4, the one with the best expert kept: the choice differs from plain top-k)
    "deepseek_v2_grouped": (
        DeepseekV2ForCausalLM, DeepseekV2Config,
        dict(DEEPSEEK, q_lora_rank=24, topk_method="group_limited_greedy", n_group=2, topk_group=1,
             n_shared_experts=1, routed_scaling_factor=1.0, rope_theta=10000.0),
        dict(save_dtype=torch.float32, group_choice=True, byte_tokenizer=True),
    ),
    # DeepSeek-V3's form: sigmoid scores with a random non-zero correction bias (selection
    # only), 4 groups of 2 ranked by their top-2 sum with 2 kept, renormalised and scaled
    # weights, interleaved RoPE, a low-rank query; YaRN with unequal mscale terms (cos/sin
    # and the softmax scale both corrected); an MTP layer's tensors in the checkpoint
    # beyond num_hidden_layers, which a loader must ignore
    "deepseek_v3": (
        DeepseekV3ForCausalLM, DeepseekV3Config,
        dict(DEEPSEEK, q_lora_rank=24, n_group=4, topk_group=2, n_shared_experts=1, norm_topk_prob=True,
             routed_scaling_factor=2.5, rope_interleave=True, num_nextn_predict_layers=1,
             rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                              "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1,
                              "rope_theta": 10000.0}),
        dict(save_dtype=torch.float32, group_choice=True, correction_bias=True, mtp_layer=True,
             byte_tokenizer=True),
    ),
    # DeepSeek-V3/R1 as released: block-scaled FP8 weights (float8_e4m3fn codes, one f32
    # `weight_scale_inv` per 128x128 block) for every linear layer but the embedding, the
    # head and the routers; widths of 128 so experts, dense and shared MLPs and the
    # latent/query down-projections are whole blocks (the dense and shared MLPs two
    # blocks wide or tall, 256), the rest partial ones. The
    # reference computes in f32 with the dequantized weights
    "deepseek_v3_fp8": (
        DeepseekV3ForCausalLM, DeepseekV3Config,
        dict(DEEPSEEK, hidden_size=128, moe_intermediate_size=128, intermediate_size=256, q_lora_rank=24,
             n_group=4, topk_group=2, n_shared_experts=2, norm_topk_prob=True, routed_scaling_factor=2.5,
             rope_interleave=True, rope_theta=10000.0),
        dict(save_dtype=torch.float32, correction_bias=True, fp8=True, byte_tokenizer=True),
    ),
    # GLM-4.5's form: GQA with half the head rotated (partial_rotary_factor 0.5), per-head
    # q/k norm, q/k/v biases (none on o), layer 0 dense, DeepSeek-V3's router (2 groups of
    # 4, one kept) with a correction bias, one shared expert
    "glm4_moe": (
        Glm4MoeForCausalLM, Glm4MoeConfig,
        dict(num_hidden_layers=3, head_dim=16, n_routed_experts=8, moe_intermediate_size=32,
             intermediate_size=64, first_k_dense_replace=1, n_shared_experts=1, n_group=2, topk_group=1,
             norm_topk_prob=True, routed_scaling_factor=1.8, use_qk_norm=True, attention_bias=True,
             partial_rotary_factor=0.5, rope_theta=10000.0, rms_norm_eps=1e-5),
        dict(save_dtype=torch.float32, group_choice=True, correction_bias=True, byte_tokenizer=True),
    ),
    "mixtral": (
        MixtralForCausalLM, MixtralConfig,
        dict(num_hidden_layers=2, num_local_experts=4, intermediate_size=32,
             rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=None),
        dict(save_dtype=torch.float32, old_rope_form=True),
    ),
    "mixtral_bf16": (
        MixtralForCausalLM, MixtralConfig,
        dict(num_hidden_layers=2, num_local_experts=4, intermediate_size=32,
             rope_theta=1000000.0, rms_norm_eps=1e-5, sliding_window=None),
        dict(save_dtype=torch.bfloat16),
    ),
    # sliding-window attention (window 5 < SEQ_LEN) and linear RoPE scaling
    "mixtral_window": (
        MixtralForCausalLM, MixtralConfig,
        dict(num_hidden_layers=2, num_local_experts=4, intermediate_size=32,
             rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
             rms_norm_eps=1e-5, sliding_window=5),
        dict(save_dtype=torch.float32),
    ),
    # YaRN RoPE as Qwen3 configs enable it (bounds of the ramp truncated to whole
    # dimensions; attention factor 0.1 ln 4 + 1), the ramp over dimensions 5..12 of 16
    "qwen3_moe_yarn": (
        Qwen3MoeForCausalLM, Qwen3MoeConfig,
        dict(num_hidden_layers=2, num_experts=8, moe_intermediate_size=32, intermediate_size=64,
             head_dim=32, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
             attention_bias=False, use_sliding_window=False, max_position_embeddings=16384,
             rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                              "rope_theta": 10000.0},
             rms_norm_eps=1e-6),
        dict(save_dtype=torch.float32),
    ),
    # YaRN as gpt-oss configures it: bounds not truncated, factor 32
    "mixtral_yarn": (
        MixtralForCausalLM, MixtralConfig,
        dict(num_hidden_layers=2, num_local_experts=4, intermediate_size=32, max_position_embeddings=131072, head_dim=16,
             rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                              "truncate": False, "original_max_position_embeddings": 4096,
                              "rope_theta": 150000.0},
             rms_norm_eps=1e-5, sliding_window=None),
        dict(save_dtype=torch.float32),
    ),
    # gpt-oss: sinks, q/k/v/o biases, a sliding layer (window 5 < SEQ_LEN) then a full
    # one, YaRN as released, a biased router (top-k of the logits, softmax over them),
    # biased experts with interleaved gate/up and a SwiGLU clamp low enough to bite
    "gpt_oss": (GptOssForCausalLM, GptOssConfig, GPT_OSS, dict(save_dtype=torch.float32)),
    # bf16 experts (and everything else), reference computed with them upcast to f32
    "gpt_oss_bf16": (GptOssForCausalLM, GptOssConfig, GPT_OSS, dict(save_dtype=torch.bfloat16)),
    # the same, with the experts stored in MXFP4 as the releases are (the reference
    # computes with transformers' dequantization of those blocks)
    "gpt_oss_mxfp4": (GptOssForCausalLM, GptOssConfig, GPT_OSS, dict(save_dtype=torch.float32, mxfp4=True)),
    "qwen2_moe": (
        Qwen2MoeForCausalLM, Qwen2MoeConfig,
        dict(num_hidden_layers=4, num_experts=4, moe_intermediate_size=32,
             shared_expert_intermediate_size=48, intermediate_size=64,
             decoder_sparse_step=1, mlp_only_layers=[2], norm_topk_prob=False,
             qkv_bias=True, use_sliding_window=False, rope_theta=1000000.0, rms_norm_eps=1e-6),
        dict(save_dtype=torch.float32, max_shard_size="300KB"),
    ),
    "qwen3_moe": (
        Qwen3MoeForCausalLM, Qwen3MoeConfig,
        dict(num_hidden_layers=2, num_experts=8, moe_intermediate_size=32, intermediate_size=64,
             head_dim=32, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
             attention_bias=False, use_sliding_window=False, rope_theta=1000000.0,
             rms_norm_eps=1e-6),
        dict(save_dtype=torch.float32),
    ),
    "olmoe": (
        OlmoeForCausalLM, OlmoeConfig,
        dict(num_hidden_layers=2, num_experts=8, intermediate_size=32, norm_topk_prob=False,
             clip_qkv=None, attention_bias=False, rope_theta=10000.0, rms_norm_eps=1e-5),
        dict(save_dtype=torch.float32),
    ),
}


def versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


# ------------------------------------------------------------------ model building


def is_router(module) -> bool:
    """The top-k router modules of transformers' MoE blocks (…TopKRouter classes, and
    DeepSeek's and GLM's …TopkRouter)."""
    return type(module).__name__.lower().endswith("topkrouter")


def selection_scores(module, logits):
    """The scores a router ranks experts by: the log of the softmax (DeepSeek-V2: the
    softmax's order, with gaps in logit units), or the sigmoid plus the correction bias
    (DeepSeek-V3, GLM)."""
    bias = getattr(module, "e_score_correction_bias", None)
    if bias is not None:
        return logits.float().sigmoid() + bias.float()
    return logits.float().log_softmax(-1)


def gap_unit(module):
    """Sigmoid scores move at most 1/4 as fast as logits: their gaps count 4x."""
    return 4.0 if getattr(module, "e_score_correction_bias", None) is not None else 1.0


def group_limited(module, logits):
    """The group scores of a grouped router (best expert, or sum of the two best biased
    scores), else None."""
    groups = getattr(module, "num_group", None)
    if groups is None or getattr(module, "topk_method", "grouped") == "greedy":
        return None
    scores = selection_scores(module, logits)
    n, e = scores.shape
    view = scores.view(n, groups, e // groups)
    if getattr(module, "e_score_correction_bias", None) is not None:
        group_scores = view.topk(2, dim=-1)[0].sum(-1)
    else:
        group_scores = view.max(-1).values
    return group_scores


def selection_gap(module, logits, k):
    """The smallest margin of a router's decisions: between the k-th and (k+1)-th
    ranked experts (among the kept groups) and, for grouped routers, between the last
    kept group and the first dropped one."""
    scores = selection_scores(module, logits)
    group_scores = group_limited(module, logits)
    if group_scores is None:
        return gap_unit(module) * float(top2_gap(scores, k).min())
    keep = module.topk_group
    group_gap = float(top2_gap(group_scores, keep).min())
    n, e = scores.shape
    groups = group_scores.shape[1]
    kept = torch.zeros_like(group_scores, dtype=torch.bool)
    kept.scatter_(1, torch.topk(group_scores, keep, dim=-1)[1], True)
    mask = kept.unsqueeze(-1).expand(n, groups, e // groups).reshape(n, e)
    masked = scores.masked_fill(~mask, float("-inf"))
    v = torch.topk(masked, k + 1, dim=-1).values
    expert_gap = torch.where(torch.isinf(v[..., k]), torch.full_like(v[..., 0], float("inf")), v[..., k - 1] - v[..., k])
    return gap_unit(module) * min(group_gap, float(expert_gap.min()))


def group_changes_choice(module, logits, ids, k):
    """Rows whose grouped choice differs from plain top-k of the selection scores."""
    plain = torch.topk(selection_scores(module, logits), k, dim=-1)[1].sort(-1).values
    return int((plain != ids.sort(-1).values).any(-1).sum())


@torch.no_grad()
def randomize_small_params(model, router_std: float, gen: torch.Generator):
    """Make the tiny model exercise every weight and route decisively.

    transformers initialises norm weights to 1 and biases to 0, so a loader that
    ignored them would go unnoticed; give them random values. Router weights are
    redrawn with a larger std so top-k choices are well separated.
    """
    for name, mod in model.named_modules():
        if is_router(mod):
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * router_std)
    for name, p in model.named_parameters():
        # gpt-oss: attention sinks and the experts' 2-D biases
        if name.endswith("sinks"):
            p.copy_(torch.randn(p.shape, generator=gen))
        elif name.endswith("proj_bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    for name, p in model.named_parameters():
        if p.dim() != 1:
            continue
        if "norm" in name:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def rewrite_config_old_rope_form(path: str):
    """Rewrite config.json the way older hub checkpoints look: top-level rope_theta,
    rope_scaling null, no rope_parameters, torch_dtype instead of dtype, no head_dim."""
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    assert rope.get("rope_type", "default") == "default", rope
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_scaling"] = None
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    if cfg.get("head_dim", 0) is None:
        del cfg["head_dim"]
    with open(path, "w") as f:
        json.dump(dict(sorted(cfg.items())), f, indent=2)
        f.write("\n")


# ------------------------------------------------------------------------ MXFP4


def quantize_experts_mxfp4(model):
    """gpt-oss experts to MXFP4 as the releases store them: per output row, blocks
    of 32 input values share an e8m0 exponent e (2^e with the block's largest
    magnitude in [4, 8)); each value is the nearest e2m1 code. The float weights
    are replaced by transformers' own dequantization of those codes
    (`convert_moe_packed_tensors`), so the reference computes with exactly the
    weights the MXFP4 checkpoint holds. Returns {parameter name: (blocks, scales)}."""
    from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors

    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    packed = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                continue
            wt = p.detach().transpose(1, 2).contiguous()  # [E, out, in]
            e_, out, inn = wt.shape
            blk = wt.reshape(e_, out, inn // 32, 32)
            amax = blk.abs().amax(-1, keepdim=True)
            exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-30))) - 2, torch.full_like(amax, -127))
            exp = exp.clamp(-127, 127)
            scaled = blk / torch.pow(2.0, exp)
            idx = (scaled[..., None] - lut).abs().argmin(-1).to(torch.uint8)  # [E, out, G, 32]
            blocks = (idx[..., 0::2] | (idx[..., 1::2] << 4)).contiguous()  # [E, out, G, 16]
            scales = (exp[..., 0] + 127).to(torch.uint8).contiguous()  # [E, out, G]
            deq = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
            p.copy_(deq)
            packed[name] = (blocks, scales)
    return packed


def write_mxfp4_checkpoint(out_dir, packed):
    """Replaces the saved float expert tensors by their `_blocks` / `_scales` and
    marks the config as MXFP4-quantized, as the gpt-oss releases are."""
    from safetensors.torch import load_file as load_st

    path = os.path.join(out_dir, "model.safetensors")
    state = load_st(path)
    for name, (blocks, scales) in packed.items():
        del state[name]
        state[name + "_blocks"] = blocks
        state[name + "_scales"] = scales
    save_file(state, path, metadata={"format": "pt"})
    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "mxfp4",
                                  "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                             "model.embed_tokens", "lm_head"]}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def add_mtp_layer(out_dir, cfg, gen):
    """Adds tensors of a multi-token-prediction layer, as DeepSeek-V3's releases hold
    one at index num_hidden_layers (transformers builds no module for it)."""
    from safetensors.torch import load_file as load_st

    path = os.path.join(out_dir, "model.safetensors")
    state = load_st(path)
    h, l = cfg.hidden_size, cfg.num_hidden_layers
    extra = {
        f"model.layers.{l}.eh_proj.weight": torch.randn(h, 2 * h, generator=gen),
        f"model.layers.{l}.enorm.weight": torch.randn(h, generator=gen),
        f"model.layers.{l}.hnorm.weight": torch.randn(h, generator=gen),
        f"model.layers.{l}.input_layernorm.weight": torch.randn(h, generator=gen),
        f"model.layers.{l}.mlp.gate.weight": torch.randn(cfg.n_routed_experts, h, generator=gen),
        f"model.layers.{l}.shared_head.norm.weight": torch.randn(h, generator=gen),
    }
    state.update(extra)
    save_file(state, path, metadata={"format": "pt"})


# -------------------------------------------------------------------- tokenizer


def write_byte_tokenizer(out_dir):
    """A byte-level tokenizer.json of our own making whose 256 tokens are the 256 bytes
    (token id = byte value, no merges), so `moe-serve generate` and `serve` can run a
    fixture on text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # GPT-2's printable stand-ins for bytes, as the ByteLevel pre-tokenizer maps them
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(out_dir, "tokenizer.json"))


# -------------------------------------------------------------------------- FP8


def fp8_blocks(w):
    """(codes, scale_inv, dequantized) of a 2-D weight: per 128x128 block, scale_inv =
    amax / 448 (1 for an all-zero block), codes = round-to-nearest float8_e4m3fn of
    w / scale_inv, dequantized = codes * scale_inv, as block-scaled FP8 checkpoints hold."""
    r, c = w.shape
    rb, cb = -(-r // 128), -(-c // 128)
    pad = torch.zeros(rb * 128, cb * 128)
    pad[:r, :c] = w
    blocks = pad.view(rb, 128, cb, 128)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    codes = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    deq = codes.float() * scale[:, None, :, None]
    crop = lambda t: t.reshape(rb * 128, cb * 128)[:r, :c].contiguous()
    return crop(codes), scale.contiguous(), crop(deq)


def quantize_fp8(model):
    """Every linear weight but the embedding, head and routers to block-scaled FP8, in
    place (the model then holds the dequantized values); returns {saved tensor name:
    (codes, scale_inv)}. Merged expert tensors are quantized per saved matrix (gate and
    up halves and down of each expert), the blocks of the checkpoint's own tensors."""
    packed = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name or name.startswith("lm_head") or name.endswith("mlp.gate.weight"):
                continue
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                base = name.rsplit(".", 1)[0]
                for e in range(p.shape[0]):
                    if name.endswith("gate_up_proj"):
                        f = p.shape[1] // 2
                        parts = [("gate_proj", slice(0, f)), ("up_proj", slice(f, 2 * f))]
                    else:
                        parts = [("down_proj", slice(0, p.shape[1]))]
                    for proj, rows in parts:
                        codes, scale, deq = fp8_blocks(p[e, rows].float())
                        p[e, rows] = deq
                        packed[f"{base}.{e}.{proj}.weight"] = (codes, scale)
            elif p.dim() == 2:
                codes, scale, deq = fp8_blocks(p.float())
                p.copy_(deq)
                packed[name] = (codes, scale)
    return packed


def write_fp8_checkpoint(out_dir, packed):
    """Replaces the saved (dequantized) f32 weights by their FP8 codes and scales and
    marks the config as FP8-quantized, as DeepSeek-V3's releases are."""
    from safetensors.torch import load_file as load_st

    path = os.path.join(out_dir, "model.safetensors")
    state = load_st(path)
    for name, (codes, scale) in packed.items():
        assert name in state, f"{name} not in the checkpoint"
        assert torch.equal(state[name], codes.float() * torch.repeat_interleave(torch.repeat_interleave(
            scale, 128, 0), 128, 1)[:codes.shape[0], :codes.shape[1]]), name
        state[name] = codes
        state[name + "_scale_inv"] = scale
    save_file(state, path, metadata={"format": "pt"})
    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


# -------------------------------------------------------------------- references


class RouterRecorder:
    """Forward hooks on the router modules; records (logits, weights, ids) per layer."""

    def __init__(self, model):
        self.records = {}
        self.handles = []
        for name, mod in model.named_modules():
            if is_router(mod):
                layer = int(name.split("layers.")[1].split(".")[0])
                self.handles.append(mod.register_forward_hook(self._hook(layer)))

    def _hook(self, layer):
        def fn(module, inputs, output):
            logits, weights, ids = output  # all routers return (logits, scores, indices)
            logits, weights, ids = logits.detach().float(), weights.detach().float(), ids.detach()
            if type(module).__name__.endswith("TopkRouter"):
                # DeepSeek's and GLM's routers take an unsorted top-k: order each row's
                # experts best first by the score selection ranks them by (ties: lower id)
                rank = selection_scores(module, logits).gather(1, ids)
                order = torch.sort(rank, dim=-1, descending=True, stable=True).indices
                ids, weights = ids.gather(1, order), weights.gather(1, order)
            self.records[layer] = (logits.clone(), weights.clone(), ids.clone(), module)
        return fn

    def clear(self):
        self.records = {}


@torch.no_grad()
def compute_reference(model, input_ids: torch.Tensor):
    rec = RouterRecorder(model)
    logits = model(input_ids=input_ids[None], use_cache=False).logits[0].float()
    routers = dict(rec.records)

    # Greedy decoding by repeated full forwards; eos is not treated specially.
    seq = input_ids.clone()
    greedy, step_logits = [], []
    for _ in range(GREEDY_STEPS):
        rec.clear()
        last = model(input_ids=seq[None], use_cache=False).logits[0, -1].float()
        nxt = int(torch.argmax(last))
        step_logits.append(last)
        greedy.append(nxt)
        seq = torch.cat([seq, torch.tensor([nxt])])
    # rec now holds the routers of the last forward: every position ever computed.
    final_routers = dict(rec.records)
    return logits, routers, torch.tensor(greedy, dtype=torch.int64), step_logits, final_routers


def top2_gap(x: torch.Tensor, k: int) -> torch.Tensor:
    """Gap between the k-th and (k+1)-th largest values along the last dim."""
    v = torch.topk(x, k + 1, dim=-1).values
    return v[..., k - 1] - v[..., k]


# -------------------------------------------------------------------------- main


def build_fixture(name, spec, seed, out_dir, args):
    model_cls, cfg_cls, cfg_kwargs, opts = spec
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = cfg_cls(**{**COMMON, **cfg_kwargs})
    model = model_cls(cfg).float().eval()
    randomize_small_params(model, args.router_std, gen)
    if opts.get("correction_bias"):
        with torch.no_grad():
            for bname, buf in model.named_buffers():
                if bname.endswith("e_score_correction_bias"):
                    buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
    input_ids = torch.randint(3, VOCAB, (SEQ_LEN,), generator=gen, dtype=torch.int64)
    packed = quantize_experts_mxfp4(model) if opts.get("mxfp4") else None
    fp8 = quantize_fp8(model) if opts.get("fp8") else None

    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    save_model = model.to(opts["save_dtype"])
    save_kwargs = {"max_shard_size": opts.get("max_shard_size", "1GB")}
    save_model.save_pretrained(out_dir, **save_kwargs)
    if opts.get("old_rope_form"):
        rewrite_config_old_rope_form(os.path.join(out_dir, "config.json"))

    # Reference = the checkpoint as reloaded from disk, in float32, eager everything.
    ref = model_cls.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager",
                                    experts_implementation="eager").eval()
    # Sanity: reloaded weights (and buffers such as the correction bias) equal what we
    # saved (upcast for bf16).
    orig = {k: v.float() for k, v in save_model.state_dict().items()}
    for k, v in ref.state_dict().items():
        assert torch.equal(v, orig[k]), f"{name}: reloaded {k} differs"
    for k, v in save_model.named_buffers():
        if k.endswith("e_score_correction_bias"):
            assert torch.equal(dict(ref.named_buffers())[k], v.float()), f"{name}: reloaded {k} differs"
            assert v.abs().max() > 0, f"{name}: {k} is zero"

    logits, routers, greedy, step_logits, final_routers = compute_reference(ref, input_ids)
    k = cfg.num_experts_per_tok

    # --- near-tie checks (on the scores each router selects by, groups included)
    min_router_gap = min(selection_gap(r[3], r[0], k) for r in final_routers.values())
    min_router_gap = min(min_router_gap,
                         min(selection_gap(r[3], r[0], k) for r in routers.values()))
    if opts.get("group_choice"):
        changed = sum(group_changes_choice(r[3], r[0], r[2], k) for r in final_routers.values())
        if changed == 0:
            stats = dict(min_router_gap=0.0, min_logit_gap=0.0, max_abs_logit=0.0)
            return None, stats  # the groups never mattered: try another seed
        print(f"   {name}: group limits change the choice of {changed} (token, layer) pairs")
    min_logit_gap = min(float(top2_gap(logits, 1).min()),
                        min(float(top2_gap(s, 1)) for s in step_logits))
    ok = min_router_gap >= args.router_gap and min_logit_gap >= args.logit_gap
    stats = dict(min_router_gap=min_router_gap, min_logit_gap=min_logit_gap,
                 max_abs_logit=float(logits.abs().max()))
    if not ok:
        return None, stats

    if packed is not None:
        write_mxfp4_checkpoint(out_dir, packed)
    if fp8 is not None:
        write_fp8_checkpoint(out_dir, fp8)
    if opts.get("byte_tokenizer"):
        write_byte_tokenizer(out_dir)
    if opts.get("mtp_layer"):
        add_mtp_layer(out_dir, cfg, gen)
    tensors = {"input_ids": input_ids, "logits": logits.contiguous(), "greedy_ids": greedy}
    for layer, (rl, w, ids, _) in sorted(routers.items()):
        tensors[f"router_logits.{layer}"] = rl.contiguous()
        tensors[f"topk_ids.{layer}"] = ids.to(torch.int64).contiguous()
        tensors[f"topk_weights.{layer}"] = w.contiguous()
    # decode steps 1..15 (step 0 is the prompt's last row of `logits`): the logits
    # after each greedy token, and the routing of those tokens' positions (the
    # last full forward's rows T..T+14: causal, so equal to each step's own)
    t = input_ids.shape[0]
    tensors["decode_logits"] = torch.stack(step_logits[1:]).contiguous()
    for layer, (_, w, ids, _) in sorted(final_routers.items()):
        tensors[f"decode_topk_ids.{layer}"] = ids[t:].to(torch.int64).contiguous()
        tensors[f"decode_topk_weights.{layer}"] = w[t:].contiguous()
    meta = {"seed": str(seed), "fixture": name, "architecture": model_cls.__name__,
            "checkpoint_dtype": str(opts["save_dtype"]).replace("torch.", ""),
            "reference_dtype": "float32", "moe_layers": json.dumps(sorted(routers)),
            "min_router_gap": f"{min_router_gap:.4f}", "min_logit_gap": f"{min_logit_gap:.5f}",
            **{f"version_{k}": v for k, v in versions().items()}}
    save_file(tensors, os.path.join(out_dir, "reference.safetensors"), metadata=meta)
    return tensors, stats


def describe(name, out_dir, tensors, stats, seed):
    files = sorted(os.listdir(out_dir))
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)
    with open(os.path.join(out_dir, "config.json")) as f:
        cfg = json.load(f)
    rope_form = ("rope_parameters" if "rope_parameters" in cfg else
                 "top-level rope_theta" if "rope_theta" in cfg else "none")
    names = []
    for fn in files:
        if fn.startswith("model") and fn.endswith(".safetensors"):
            with safe_open(os.path.join(out_dir, fn), "pt") as st:
                names += [(n, st.get_slice(n).get_shape(), st.get_slice(n).get_dtype())
                          for n in st.keys()]
    print(f"== {name}: seed {seed}, {size / 1024:.0f} KiB, files {files}")
    print(f"   rope form: {rope_form}; max|logit| {stats['max_abs_logit']:.3f};"
          f" min router gap {stats['min_router_gap']:.4f}; min logit gap {stats['min_logit_gap']:.5f}")
    print(f"   reference tensors: {sorted(tensors)}")
    print(f"   greedy_ids: {tensors['greedy_ids'].tolist()}")
    # Show each distinct name pattern once (first layer it appears in; expert 0 only).
    seen, shown = set(), []
    for t in sorted(names, key=lambda t: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", t[0])]):
        pattern = re.sub(r"experts\.\d+\.", "experts.N.", re.sub(r"layers\.\d+\.", "layers.L.", t[0]))
        if pattern not in seen:
            seen.add(pattern)
            shown.append(t)
    print(f"   checkpoint tensors ({len(names)} total; one per name pattern):")
    for n, shape, dt in shown:
        print(f"     {n} {shape} {dt}")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures", help="fixtures directory")
    ap.add_argument("--seed", type=int, default=1000, help="first seed tried per fixture")
    ap.add_argument("--max-tries", type=int, default=50)
    ap.add_argument("--router-std", type=float, default=0.4, help="std of router weights")
    ap.add_argument("--router-gap", type=float, default=0.02)
    ap.add_argument("--logit-gap", type=float, default=2e-3)
    ap.add_argument("--only", nargs="*", help="generate only these fixtures")
    args = ap.parse_args()
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    os.makedirs(args.out, exist_ok=True)

    for name, spec in FIXTURES.items():
        if args.only and name not in args.only:
            continue
        out_dir = os.path.join(args.out, name)
        for attempt in range(args.max_tries):
            seed = args.seed + attempt
            tensors, stats = build_fixture(name, spec, seed, out_dir, args)
            if tensors is not None:
                break
            print(f"-- {name}: seed {seed} rejected (router gap {stats['min_router_gap']:.4f},"
                  f" logit gap {stats['min_logit_gap']:.5f})", flush=True)
        else:
            shutil.rmtree(out_dir, ignore_errors=True)
            raise SystemExit(f"{name}: no seed in {args.max_tries} tries passes the gap checks")
        describe(name, out_dir, tensors, stats, seed)


if __name__ == "__main__":
    main()
