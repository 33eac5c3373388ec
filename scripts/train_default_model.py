#!/usr/bin/env python3
"""Train the server's default demo model: a tiny Mixtral-style MoE on Tiny Shakespeare.

What it produces (in --out, e.g. models/tiny-shakespeare-moe):
  * tokenizer.json          byte-level BPE (vocab 2048) trained on the training split;
                            special tokens <unk>=0, <s>=1, </s>=2, <|system|>=3,
                            <|user|>=4, <|assistant|>=5; a TemplateProcessing
                            post-processor prepends <s> to single sequences.
  * tokenizer_config.json   bos/eos/unk tokens, model_max_length 512, a Jinja chat template.
  * config.json, model.safetensors
                            a transformers MixtralForCausalLM (hidden 128, 4 layers,
                            8 experts, top-2) saved with save_pretrained in bfloat16.
  * generation_config.json  bos 1, eos 2, do_sample, temperature 0.8, top_p 0.95.
  * training_log.json       tokens seen, steps, losses, wall time, versions, seed.

The corpus is split 90/10 (train/validation) by contiguous text: the split point is the
first newline at or after 90% of the characters. Training samples random windows of
the tokenized training text; every window starts with <s> so the model sees the same
"beginning of text" marker the tokenizer adds at inference time.

The number of optimizer steps is chosen at run time: the script times the first steps
(and one validation pass) and sizes the run so that it takes about --minutes on one CPU
thread. The weights kept are those with the best validation loss seen (early stopping
against overfitting of this small corpus); the log records both the final and best values.

Load balancing: the loss is next-token cross-entropy + --aux-loss-coef times a
Switch-style balancing loss computed per layer and averaged (transformers' own aux loss
pools the expert counts of all layers, which left experts of single layers unused in a
first run). Each validation pass prints the min/max share of top-k selections per layer.

How to run (one CPU thread; the corpus is never copied into the repo):
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python scripts/train_default_model.py \
      --corpus ../shared/corpora/tinyshakespeare.txt \
      --out models/tiny-shakespeare-moe --minutes 40
"""

import argparse
import copy
import json
import math
import os
import platform
import sys
import time

# Keep torch on a single thread before it is imported (the machine is shared).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import torch
import tokenizers
import transformers
import safetensors
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
BOS_ID, EOS_ID = 1, 2

# Chat template: <s> once, then each message as "<|role|>\ncontent</s>\n".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def log(msg: str) -> None:
    """Print with flush so a nohup'd log is readable while training runs."""
    print(msg, flush=True)


# --------------------------------------------------------------------------- data


def split_corpus(text: str, train_fraction: float = 0.9):
    """Deterministic contiguous split at the first newline at/after train_fraction."""
    cut = int(len(text) * train_fraction)
    nl = text.find("\n", cut)
    if nl != -1:
        cut = nl + 1
    return text[:cut], text[cut:]


def build_tokenizer(train_text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE so that any UTF-8 text round-trips through encode/decode."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # assigned ids 0..5 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([train_text], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B:1",
        special_tokens=[("<s>", BOS_ID)],
    )
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} got id {tok.token_to_id(t)}"
    return tok


def encode_stream(tok: Tokenizer, text: str) -> np.ndarray:
    """Token ids of a whole text, without the <s> added by the post-processor."""
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def sample_batch(ids: np.ndarray, batch: int, seq_len: int, rng: np.random.Generator):
    """Random windows of seq_len-1 corpus tokens, each preceded by <s>."""
    starts = rng.integers(0, len(ids) - (seq_len - 1), size=batch)
    out = np.empty((batch, seq_len), dtype=np.int64)
    out[:, 0] = BOS_ID
    for b, s in enumerate(starts):
        out[b, 1:] = ids[s : s + seq_len - 1]
    return torch.from_numpy(out)


def val_windows(ids: np.ndarray, seq_len: int) -> torch.Tensor:
    """Non-overlapping validation windows (<s> + seq_len-1 tokens) covering the split."""
    n = len(ids) // (seq_len - 1)
    out = np.empty((n, seq_len), dtype=np.int64)
    out[:, 0] = BOS_ID
    out[:, 1:] = ids[: n * (seq_len - 1)].reshape(n, seq_len - 1)
    return torch.from_numpy(out)


# -------------------------------------------------------------------------- model


def make_config(vocab_size: int) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=None,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
        sliding_window=None,
    )


def lm_loss_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy only (no router auxiliary loss)."""
    return next_token_loss(model(input_ids=input_ids).logits, input_ids)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1)
    )


def per_layer_balance_loss(router_logits, num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss computed for each layer separately, then averaged.

    transformers' built-in aux loss sums the expert counts of all layers before taking
    the product, so it only balances the *aggregate* over layers: a layer may leave
    experts unused while another over-uses them. Per layer: E * sum_e f_e * P_e, with
    f_e the fraction of the top-k assignments going to expert e (sums to top_k, as in
    transformers, so a perfectly balanced layer scores top_k) and P_e its mean router
    probability.
    """
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        top = torch.topk(probs, top_k, dim=-1).indices
        f = torch.zeros(num_experts, device=probs.device).scatter_add_(
            0, top.reshape(-1), torch.ones(top.numel(), device=probs.device)) / probs.shape[0]
        losses.append(num_experts * torch.sum(f * probs.mean(0)))
    return torch.stack(losses).mean()


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int):
    """Mean next-token loss over all validation windows, and per-layer expert shares
    (fraction of top-k selections per expert, <s> positions excluded)."""
    model.eval()
    total, count = 0.0, 0
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts)
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch]
        out = model(input_ids=x, output_router_logits=True)
        total += next_token_loss(out.logits, x).item() * x.shape[0]
        count += x.shape[0]
        for l, rl in enumerate(out.router_logits):
            rl = rl.view(x.shape[0], x.shape[1], -1)[:, 1:]
            top = torch.topk(rl, cfg.num_experts_per_tok, dim=-1).indices
            counts[l] += torch.bincount(top.reshape(-1), minlength=cfg.num_local_experts).float()
    model.train()
    shares = counts / counts.sum(-1, keepdim=True)
    return total / count, shares


# ------------------------------------------------------------------------- saving


def save_all(out_dir, model, tok, log_info):
    os.makedirs(out_dir, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.config.output_router_logits = False  # inference default
    model.save_pretrained(out_dir, max_shard_size="1GB")  # single model.safetensors
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)
        f.write("\n")
    GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, do_sample=True, temperature=0.8, top_p=0.95
    ).save_pretrained(out_dir)
    with open(os.path.join(out_dir, "training_log.json"), "w") as f:
        json.dump(log_info, f, indent=2)
        f.write("\n")


# --------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", required=True, help="path to tinyshakespeare.txt")
    ap.add_argument("--out", required=True, help="output model directory")
    ap.add_argument("--minutes", type=float, default=40.0, help="target wall time")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr")
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-loss-coef", type=float, default=0.03,
                    help="weight of the per-layer load-balancing loss")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=125)
    ap.add_argument("--timing-steps", type=int, default=20, help="steps used to measure speed")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    # ---- data and tokenizer
    with open(args.corpus, encoding="utf-8") as f:
        text = f.read()
    train_text, val_text = split_corpus(text)
    tok = build_tokenizer(train_text, args.vocab_size)
    train_ids, val_ids = encode_stream(tok, train_text), encode_stream(tok, val_text)
    assert tok.get_vocab_size() == args.vocab_size, tok.get_vocab_size()
    log(f"corpus: {len(text)} chars; train {len(train_text)} chars / {len(train_ids)} tokens;"
        f" val {len(val_text)} chars / {len(val_ids)} tokens; vocab {tok.get_vocab_size()}")
    vwin = val_windows(val_ids, args.seq_len)

    # ---- model
    cfg = make_config(args.vocab_size)
    cfg.router_aux_loss_coef = args.aux_loss_coef
    model = MixtralForCausalLM(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: MixtralForCausalLM, {n_params} parameters")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    # The total step count is only known after timing, so the schedule reads it lazily.
    plan = {"total": 10**9}

    def lr_at(step):  # step is 0-based
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        prog = min(1.0, (step - args.warmup_steps) / max(1, plan["total"] - args.warmup_steps))
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))

    # One validation pass at init (also measures evaluation cost).
    t0 = time.time()
    val0, _ = evaluate(model, vwin, args.batch_size)
    eval_time = time.time() - t0
    log(f"step 0: val loss {val0:.4f} (eval takes {eval_time:.1f}s)")

    tokens_per_step = args.batch_size * args.seq_len
    budget = args.minutes * 60.0
    step, tokens_seen = 0, 0
    best = {"val": float("inf"), "step": 0, "state": None}
    last_val, recent = val0, []
    t_train = time.time()
    while step < plan["total"]:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = sample_batch(train_ids, args.batch_size, args.seq_len, rng)
        out = model(input_ids=x, output_router_logits=True)
        lm_loss = next_token_loss(out.logits, x)
        aux = per_layer_balance_loss(out.router_logits, cfg.num_local_experts, cfg.num_experts_per_tok)
        loss = lm_loss + cfg.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += tokens_per_step
        recent.append(lm_loss.item())

        if step == args.timing_steps:
            # Size the run: remaining time / time per step, minus evaluation passes.
            elapsed_total = time.time() - t_start
            per_step = (time.time() - t_train) / step
            remaining = budget - elapsed_total - 15.0  # margin for saving
            per_step_with_eval = per_step + eval_time / args.eval_every
            plan["total"] = max(step + 1, step + int(remaining / per_step_with_eval))
            log(f"timing: {per_step:.3f}s/step ({tokens_per_step / per_step:.0f} tok/s);"
                f" planning {plan['total']} steps (~{plan['total'] * tokens_per_step} tokens)")

        if step % args.log_every == 0 or step == plan["total"]:
            log(f"step {step}/{plan['total'] if plan['total'] < 10**9 else '?'}"
                f"  train loss {np.mean(recent):.4f}  balance {aux.item():.3f} (even = {cfg.num_experts_per_tok})"
                f"  lr {lr_at(step - 1):.2e}  tokens {tokens_seen}"
                f"  elapsed {time.time() - t_start:.0f}s")
            recent = []
        if step % args.eval_every == 0 or step == plan["total"]:
            last_val, shares = evaluate(model, vwin, args.batch_size)
            tag = ""
            if last_val < best["val"]:
                best = {"val": last_val, "step": step, "shares": shares.tolist(),
                        "state": copy.deepcopy(model.state_dict())}
                tag = " (best)"
            log(f"step {step}: val loss {last_val:.4f}{tag}; min/max expert share per layer: "
                + " ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(shares.min(1).values.tolist(),
                                                            shares.max(1).values.tolist())))

    final_train = lm_loss_of_batches(model, train_ids, args, rng)
    wall = time.time() - t_start
    log(f"done: {step} steps, {tokens_seen} tokens, {wall:.0f}s;"
        f" final val {last_val:.4f}, best val {best['val']:.4f} at step {best['step']}")

    # Keep the best-validation weights.
    model.load_state_dict(best["state"])
    best_train = lm_loss_of_batches(model, train_ids, args, rng)
    info = {
        "model": "MixtralForCausalLM",
        "parameters": n_params,
        "seed": args.seed,
        "corpus": os.path.basename(args.corpus),
        "split": "first 90% of characters (cut at next newline) train, rest validation",
        "train_tokens_in_split": int(len(train_ids)),
        "val_tokens_in_split": int(len(val_ids)),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "peak_lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "steps": step,
        "tokens_seen": tokens_seen,
        "final_train_loss": round(final_train, 4),
        "final_val_loss": round(last_val, 4),
        "saved_checkpoint_step": best["step"],
        "saved_checkpoint_train_loss": round(best_train, 4),
        "saved_checkpoint_val_loss": round(best["val"], 4),
        "saved_checkpoint_val_expert_shares": [[round(v, 4) for v in row] for row in best["shares"]],
        "balance_loss": "per-layer Switch loss averaged over layers (see per_layer_balance_loss)",
        "initial_val_loss": round(val0, 4),
        "wall_time_s": round(wall, 1),
        "threads": args.threads,
        "saved_dtype": "bfloat16",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
        },
    }
    save_all(args.out, model, tok, info)
    log(f"saved to {args.out}: {sorted(os.listdir(args.out))}")


@torch.no_grad()
def lm_loss_of_batches(model, ids, args, rng, n_batches: int = 8) -> float:
    """Train-split loss on a few fresh random batches (eval mode, no aux loss)."""
    model.eval()
    vals = [lm_loss_of(model, sample_batch(ids, args.batch_size, args.seq_len, rng)).item()
            for _ in range(n_batches)]
    model.train()
    return float(np.mean(vals))


if __name__ == "__main__":
    sys.exit(main())
