#!/usr/bin/env python3
"""Check tests/fixtures with an independent from-scratch forward pass (no transformers).

Reads each fixture's config.json and raw safetensors checkpoint (single file or shards),
re-implements the forward math of Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE in plain torch
(float32), and compares with reference.safetensors: logits, router logits, top-k expert
ids and weights, the 16 greedy tokens, and each decode step's logits and routing. It serves both as a check of the fixtures and
as an executable description of the math a Rust implementation must reproduce.

How to run:
  OMP_NUM_THREADS=1 python scripts/verify_fixtures.py --fixtures tests/fixtures
Exit status 0 when every fixture matches (logits within --atol).
"""

import argparse
import json
import math
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from safetensors.torch import load_file


def load_checkpoint(d):
    """All checkpoint tensors as float32, from model.safetensors or the sharded index."""
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    w = {}
    for fn in files:
        for k, v in load_file(os.path.join(d, fn)).items():
            w[k] = v if v.dtype == torch.uint8 else v.float()
    # MXFP4 experts (gpt-oss): decoded here from the OCP microscaling spec, not by
    # transformers: e2m1 codes, two per byte (low nibble first), times 2^(e8m0 - 127)
    e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    for k in [k for k in w if k.endswith("_blocks")]:
        blocks, scales = w.pop(k), w.pop(k[: -len("_blocks")] + "_scales")
        codes = torch.stack([blocks & 0x0F, blocks >> 4], -1).flatten(-2).long()  # [E, out, G, 32]
        vals = e2m1[codes] * torch.pow(2.0, scales.float() - 127)[..., None]
        w[k[: -len("_blocks")]] = vals.flatten(-2).transpose(1, 2).contiguous()  # [E, in, out], x @ W
    return w


class Cfg:
    """The config fields the forward needs, accepting old and new key spellings."""

    def __init__(self, c):
        self.arch = c["model_type"]
        self.hidden = c["hidden_size"]
        self.layers = c["num_hidden_layers"]
        self.heads = c["num_attention_heads"]
        self.kv_heads = c.get("num_key_value_heads") or self.heads
        self.head_dim = c.get("head_dim") or self.hidden // self.heads
        self.eps = c["rms_norm_eps"]
        # Rope base: new form {"rope_parameters": {"rope_theta": ..}}, old form top-level.
        rp = c.get("rope_parameters") or {}
        self.theta = rp.get("rope_theta", c.get("rope_theta", 10000.0))
        self.rope_params = rp or (c.get("rope_scaling") or {})
        self.max_pos = c.get("max_position_embeddings", 4096)
        self.window = c.get("sliding_window") if self.arch in ("mixtral", "gpt_oss") else None
        # gpt-oss: the window only on sliding layers
        self.layer_types = c.get("layer_types")
        self.swiglu_limit = c.get("swiglu_limit", 7.0)
        self.swiglu_alpha = c.get("swiglu_alpha", 1.702)
        self.n_experts = c.get("num_local_experts") or c.get("num_experts")
        self.top_k = c["num_experts_per_tok"]
        # Mixtral always renormalises the top-k weights; the others only if norm_topk_prob.
        self.norm_topk = True if self.arch == "mixtral" else bool(c.get("norm_topk_prob", False))
        self.clip_qkv = c.get("clip_qkv")
        self.mlp_only = set(c.get("mlp_only_layers") or [])
        self.sparse_step = c.get("decoder_sparse_step", 1)

    def is_moe(self, l):
        return l not in self.mlp_only and (l + 1) % self.sparse_step == 0


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def linear(x, w, b=None):
    y = x @ w.T
    return y + b if b is not None else y


def inv_freq_and_scale(d, theta, params, max_pos):
    """RoPE inverse frequencies and cos/sin scale for the config's scaling: none,
    linear (positions / factor) or YaRN (arXiv 2309.00071, section 3: frequencies of
    dimensions with fewer than beta_slow rotations over the original context are
    divided by the factor, those with more than beta_fast kept, a linear ramp between;
    cos/sin scaled by 0.1 ln(factor) + 1)."""
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "linear":
        return inv / params["factor"], 1.0
    if kind != "yarn":
        return inv, 1.0
    orig = params.get("original_max_position_embeddings", max_pos)
    factor = params.get("factor") or max_pos / orig
    # the dimension index whose wavelength fits `rotations` times in the original context
    dim_for = lambda rotations: d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    lo, hi = dim_for(params.get("beta_fast") or 32), dim_for(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - lo) / max(hi - lo, 1e-3)).clamp(0, 1)
    scale = params.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv / factor * ramp + inv * (1 - ramp), scale


def rope(x, pos, theta, params=None, max_pos=4096):
    """Rotate-half RoPE on [T, heads, d]: pairs (i, i + d/2), inv_freq = theta^(-2i/d),
    rescaled as the config asks."""
    d = x.shape[-1]
    inv, scale = inv_freq_and_scale(d, theta, params or {}, max_pos)
    ang = pos[:, None].float() * inv[None, :]  # [T, d/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :] * scale
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :] * scale
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention(cfg, w, p, h, l):
    T = h.shape[0]
    g = lambda n: w.get(f"{p}.{n}")
    q = linear(h, g("q_proj.weight"), g("q_proj.bias"))
    k = linear(h, g("k_proj.weight"), g("k_proj.bias"))
    v = linear(h, g("v_proj.weight"), g("v_proj.bias"))
    if cfg.arch == "olmoe":
        # OLMoE: RMSNorm over the whole projection (all heads together), then clip.
        q = rms_norm(q, g("q_norm.weight"), cfg.eps)
        k = rms_norm(k, g("k_norm.weight"), cfg.eps)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q = q.view(T, cfg.heads, cfg.head_dim)
    k = k.view(T, cfg.kv_heads, cfg.head_dim)
    v = v.view(T, cfg.kv_heads, cfg.head_dim)
    if cfg.arch == "qwen3_moe":
        # Qwen3: RMSNorm per head over head_dim (weight shape [head_dim]), before RoPE.
        q = rms_norm(q, g("q_norm.weight"), cfg.eps)
        k = rms_norm(k, g("k_norm.weight"), cfg.eps)
    pos = torch.arange(T)
    q, k = (rope(t, pos, cfg.theta, cfg.rope_params, cfg.max_pos) for t in (q, k))
    rep = cfg.heads // cfg.kv_heads  # query head j uses kv head j // rep
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / cfg.head_dim ** 0.5
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    sliding = cfg.layer_types is None or cfg.layer_types[l] == "sliding_attention"
    if cfg.window and sliding:
        # keys more than window - 1 positions back are masked
        mask |= torch.tril(torch.ones(T, T, dtype=torch.bool), -cfg.window)
    scores = scores.masked_fill(mask, float("-inf"))
    if g("sinks") is not None:
        # gpt-oss: one more logit per head in each softmax, dropped after it
        sink = g("sinks")[:, None, None].expand(-1, T, 1)
        probs = torch.cat([scores, sink], -1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    out = torch.einsum("hqk,khd->qhd", probs, v).reshape(T, cfg.heads * cfg.head_dim)
    return linear(out, g("o_proj.weight"), g("o_proj.bias"))


def swiglu(h, wg, wu, wd):
    return linear(torch.nn.functional.silu(linear(h, wg)) * linear(h, wu), wd)


def gpt_oss_moe(cfg, w, p, h):
    """gpt-oss: top-k of the biased router logits, softmax over those k; experts
    from merged [E, in, out] tensors (gate and up interleaved by column) with
    biases and a clamped SwiGLU."""
    logits = linear(h, w[f"{p}.router.weight"], w[f"{p}.router.bias"])
    top_l, top_i = torch.topk(logits, cfg.top_k, dim=-1)
    top_w = top_l.softmax(-1)
    out = torch.zeros_like(h)
    lim, alpha = cfg.swiglu_limit, cfg.swiglu_alpha
    for t in range(h.shape[0]):
        for j in range(cfg.top_k):
            e = int(top_i[t, j])
            gu = h[t] @ w[f"{p}.experts.gate_up_proj"][e] + w[f"{p}.experts.gate_up_proj_bias"][e]
            gate, up = gu[0::2].clamp(max=lim), gu[1::2].clamp(-lim, lim)
            act = (up + 1) * gate * torch.sigmoid(alpha * gate)
            y = act @ w[f"{p}.experts.down_proj"][e] + w[f"{p}.experts.down_proj_bias"][e]
            out[t] += top_w[t, j] * y
    return out, logits, top_i, top_w


def moe(cfg, w, p, h):
    """Returns (output, router_logits, topk_ids, topk_weights)."""
    if cfg.arch == "gpt_oss":
        return gpt_oss_moe(cfg, w, p, h)
    logits = linear(h, w[f"{p}.gate.weight"])
    probs = logits.softmax(-1)  # softmax over all experts first, then top-k
    top_w, top_i = torch.topk(probs, cfg.top_k, dim=-1)
    if cfg.norm_topk:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for j in range(cfg.top_k):
            e = int(top_i[t, j])
            if cfg.arch == "mixtral":  # w1 = gate, w3 = up, w2 = down
                ws = [w[f"{p}.experts.{e}.{n}.weight"] for n in ("w1", "w3", "w2")]
            else:
                ws = [w[f"{p}.experts.{e}.{n}_proj.weight"] for n in ("gate", "up", "down")]
            out[t] += top_w[t, j] * swiglu(h[t:t + 1], *ws)[0]
    if f"{p}.shared_expert_gate.weight" in w:  # Qwen2-MoE shared expert
        shared = swiglu(h, *[w[f"{p}.shared_expert.{n}_proj.weight"] for n in ("gate", "up", "down")])
        out = out + torch.sigmoid(linear(h, w[f"{p}.shared_expert_gate.weight"])) * shared
    return out, logits, top_i, top_w


def forward(cfg, w, ids):
    x = w["model.embed_tokens.weight"][ids]
    routers = {}
    for l in range(cfg.layers):
        p = f"model.layers.{l}"
        x = x + attention(cfg, w, f"{p}.self_attn", rms_norm(x, w[f"{p}.input_layernorm.weight"], cfg.eps), l)
        h = rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], cfg.eps)
        if cfg.is_moe(l):
            mp = f"{p}.block_sparse_moe" if cfg.arch == "mixtral" else f"{p}.mlp"
            out, rl, ti, tw = moe(cfg, w, mp, h)
            routers[l] = (rl, ti, tw)
        else:
            out = swiglu(h, *[w[f"{p}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down")])
        x = x + out
    x = rms_norm(x, w["model.norm.weight"], cfg.eps)
    return linear(x, w["lm_head.weight"]), routers


def check(d, atol):
    with open(os.path.join(d, "config.json")) as f:
        cfg = Cfg(json.load(f))
    w = load_checkpoint(d)
    ref = load_file(os.path.join(d, "reference.safetensors"))
    ids = ref["input_ids"]
    with torch.no_grad():
        logits, routers = forward(cfg, w, ids)
        errs = {"logits": float((logits - ref["logits"]).abs().max())}
        same_ids = True
        for l, (rl, ti, tw) in routers.items():
            errs[f"router_logits.{l}"] = float((rl - ref[f"router_logits.{l}"]).abs().max())
            errs[f"topk_weights.{l}"] = float((tw - ref[f"topk_weights.{l}"]).abs().max())
            same_ids &= torch.equal(ti, ref[f"topk_ids.{l}"])
        ref_layers = sorted(int(k.split(".")[1]) for k in ref if k.startswith("router_logits."))
        same_layers = ref_layers == sorted(routers)
        seq = ids.clone()
        for step in range(len(ref["greedy_ids"])):
            step_logits, step_routers = forward(cfg, w, seq)
            if step > 0:
                # decode step `step`: the logits after greedy token `step`, the routing of its position
                errs["decode_logits"] = max(errs.get("decode_logits", 0.0),
                                            float((step_logits[-1] - ref["decode_logits"][step - 1]).abs().max()))
                for l, (_, ti, tw) in step_routers.items():
                    errs[f"decode_topk_weights.{l}"] = max(
                        errs.get(f"decode_topk_weights.{l}", 0.0),
                        float((tw[-1] - ref[f"decode_topk_weights.{l}"][step - 1]).abs().max()))
                    same_ids &= torch.equal(ti[-1], ref[f"decode_topk_ids.{l}"][step - 1])
            seq = torch.cat([seq, step_logits[-1].argmax()[None]])
        same_greedy = torch.equal(seq[len(ids):], ref["greedy_ids"])
    worst = max(errs.values())
    ok = worst <= atol and same_ids and same_greedy and same_layers
    print(f"{os.path.basename(d):14s} {'OK ' if ok else 'FAIL'} max abs err {worst:.2e}"
          f" (logits {errs['logits']:.2e}); topk ids {'equal' if same_ids else 'DIFFER'};"
          f" moe layers {ref_layers}; greedy {'equal' if same_greedy else 'DIFFERS'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixtures", default="tests/fixtures")
    ap.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = sorted(n for n in os.listdir(args.fixtures)
                   if os.path.exists(os.path.join(args.fixtures, n, "reference.safetensors")))
    results = [check(os.path.join(args.fixtures, n), args.atol) for n in names]
    return 0 if results and all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
