#!/usr/bin/env python3
"""Routing statistics of the default model vs. the same architecture at random init.

For the trained model in --model and for a freshly initialised MixtralForCausalLM with
the same config and the training seed (i.e. the weights training started from), runs
the validation split of the corpus (same 90/10 split as scripts/train_default_model.py,
first --tokens tokens, in windows of <s> + 255 tokens; the <s> positions are excluded)
and reports per MoE layer:

  * mean top-1 router probability (softmax over all experts, largest entry);
  * expert-use entropy in bits of the distribution of all top-k selections
    (log2(E) = 3 bits for 8 experts means perfectly even use);
  * min / max share of the top-k selections that go to one expert (even = 1/E);
  * predictability of layer l+1's top-1 expert from layer l's top-1 expert: the best
    mapping (most frequent successor of each expert) is learned on the first half of the
    tokens and its accuracy measured on the second half, next to the chance level
    (always predicting the most frequent layer-(l+1) expert of the first half).

Prints a markdown table, writes <model>/routing_stats.json, and prints text samples
(one greedy, two sampled with temperature 0.8 / top-p 0.95) for the prompt "ROMEO:".

How to run (one CPU thread, ~1 minute):
  OMP_NUM_THREADS=1 python scripts/routing_stats.py \
      --model models/tiny-shakespeare-moe --corpus ../shared/corpora/tinyshakespeare.txt
"""

import argparse
import json
import math
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import torch
from tokenizers import Tokenizer
import transformers
from transformers import AutoConfig, MixtralForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_default_model import BOS_ID, split_corpus, val_windows  # noqa: E402 (same split)


@torch.no_grad()
def collect_routing(model, windows: torch.Tensor, batch: int = 16):
    """Router logits per MoE layer for all non-<s> positions: {layer: [N, E] float32}."""
    model.eval()
    found = {}
    handles = []
    for name, mod in model.named_modules():
        if type(mod).__name__.endswith("TopKRouter"):
            layer = int(name.split("layers.")[1].split(".")[0])
            found[layer] = []

            def hook(module, inputs, output, layer=layer):
                found[layer].append(output[0].detach().float())
            handles.append(mod.register_forward_hook(hook))
    seq = windows.shape[1]
    for i in range(0, len(windows), batch):
        model(input_ids=windows[i:i + batch], use_cache=False)
    for h in handles:
        h.remove()
    out = {}
    for layer, chunks in found.items():
        x = torch.cat(chunks)  # [n_windows * seq, E], window-major
        x = x.view(-1, seq, x.shape[-1])[:, 1:].reshape(-1, x.shape[-1])  # drop <s> rows
        out[layer] = x
    return out


def layer_stats(logits: torch.Tensor, k: int):
    probs = logits.softmax(-1)
    E = logits.shape[-1]
    topk = torch.topk(probs, k, dim=-1).indices
    counts = torch.bincount(topk.reshape(-1), minlength=E).double()
    share = counts / counts.sum()
    nz = share[share > 0]
    entropy = float(-(nz * nz.log2()).sum())
    return {
        "mean_top1_prob": float(probs.max(-1).values.mean()),
        "entropy_bits": entropy,
        "max_entropy_bits": math.log2(E),
        "min_share": float(share.min()),
        "max_share": float(share.max()),
        "share_per_expert": [round(float(s), 4) for s in share],
    }, topk[:, 0]


def transition_predictability(a: torch.Tensor, b: torch.Tensor, E: int):
    """Learn expert(l) -> most frequent expert(l+1) on the first half, test on the second."""
    n = len(a) // 2
    a_tr, b_tr, a_te, b_te = a[:n], b[:n], a[n:], b[n:]
    joint = torch.zeros(E, E, dtype=torch.long)
    joint.index_put_((a_tr, b_tr), torch.ones_like(a_tr), accumulate=True)
    majority = int(torch.bincount(b_tr, minlength=E).argmax())
    mapping = torch.where(joint.sum(1) > 0, joint.argmax(1), torch.full((E,), majority))
    acc = float((mapping[a_te] == b_te).double().mean())
    chance = float((b_te == majority).double().mean())
    return acc, chance


def analyse(model, windows, k):
    routers = collect_routing(model, windows)
    layers = sorted(routers)
    E = routers[layers[0]].shape[-1]
    stats, top1 = {}, {}
    for l in layers:
        stats[l], top1[l] = layer_stats(routers[l], k)
    for l in layers[:-1]:
        acc, chance = transition_predictability(top1[l], top1[l + 1], E)
        stats[l]["next_layer_top1_accuracy"] = acc
        stats[l]["next_layer_top1_chance"] = chance
    return stats, int(routers[layers[0]].shape[0])


def markdown(results):
    rows = ["| model | layer | mean top-1 prob | expert-use entropy (bits, max 3) | min share"
            " | max share | top-1 l→l+1 accuracy | chance (majority) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, stats in results.items():
        for l, s in sorted(stats.items()):
            acc = s.get("next_layer_top1_accuracy")
            ch = s.get("next_layer_top1_chance")
            rows.append(
                f"| {name} | {l} | {s['mean_top1_prob']:.3f} | {s['entropy_bits']:.3f} |"
                f" {s['min_share']:.3f} | {s['max_share']:.3f} |"
                f" {'-' if acc is None else f'{acc:.3f}'} | {'-' if ch is None else f'{ch:.3f}'} |")
    return "\n".join(rows)


@torch.no_grad()
def samples(model, tok, prompt, n_sampled, max_new, seed):
    ids = torch.tensor([tok.encode(prompt).ids])  # post-processor adds <s>
    out = []
    g = model.generate(ids, do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new)
    out.append(("greedy", tok.decode(g[0].tolist(), skip_special_tokens=True)))
    torch.manual_seed(seed)
    for i in range(n_sampled):
        g = model.generate(ids, do_sample=True, temperature=0.8, top_p=0.95,
                           max_new_tokens=max_new, min_new_tokens=max_new)
        out.append((f"sampled {i + 1} (T=0.8, top-p 0.95)",
                    tok.decode(g[0].tolist(), skip_special_tokens=True)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="trained model directory")
    ap.add_argument("--corpus", required=True, help="path to tinyshakespeare.txt")
    ap.add_argument("--tokens", type=int, default=20000, help="validation tokens to use")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=None, help="init seed (default: training_log.json)")
    ap.add_argument("--prompt", default="ROMEO:")
    ap.add_argument("--sample-tokens", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()

    log_path = os.path.join(args.model, "training_log.json")
    seed = args.seed
    if seed is None:
        with open(log_path) as f:
            seed = json.load(f)["seed"]

    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    with open(args.corpus, encoding="utf-8") as f:
        _, val_text = split_corpus(f.read())
    val_ids = np.asarray(tok.encode(val_text, add_special_tokens=False).ids, dtype=np.int64)
    n_windows = max(1, math.ceil(args.tokens / (args.seq_len - 1)))
    windows = val_windows(val_ids, args.seq_len)[:n_windows]

    trained = MixtralForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    config = AutoConfig.from_pretrained(args.model)
    torch.manual_seed(seed)
    random_init = MixtralForCausalLM(config).float().eval()
    k = config.num_experts_per_tok

    results, n_tokens = {}, 0
    for name, model in (("trained", trained), ("random init", random_init)):
        results[name], n_tokens = analyse(model, windows, k)
    table = markdown(results)
    print(f"Routing statistics on {n_tokens} validation tokens ({len(windows)} windows of"
          f" <s> + {args.seq_len - 1} tokens), top-{k} of {config.num_local_experts} experts;"
          f" shares are fractions of all top-{k} selections (even = {1 / config.num_local_experts:.3f}).\n")
    print(table)
    with open(os.path.join(args.model, "routing_stats.json"), "w") as f:
        json.dump({"validation_tokens": n_tokens, "seq_len": args.seq_len, "init_seed": seed,
                   "top_k": k, "num_experts": config.num_local_experts,
                   "chance_definition": "accuracy of always predicting the most frequent "
                                        "layer-(l+1) top-1 expert of the first half",
                   "results": {n: {str(l): s for l, s in st.items()} for n, st in results.items()}},
                  f, indent=2)
        f.write("\n")

    print(f"\nSamples for prompt {args.prompt!r} ({args.sample_tokens} new tokens):")
    for label, text in samples(trained, tok, args.prompt, 2, args.sample_tokens, seed):
        print(f"\n--- {label} ---\n{text}")


if __name__ == "__main__":
    main()
