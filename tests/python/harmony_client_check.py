#!/usr/bin/env python3
"""Checks harmony chat completions with the official OpenAI Python client.

`--make-model OUT` writes the test model first: the built-in model with its last four
vocabulary entries renamed to harmony's markup tokens (`<|start|>`, `<|end|>`,
`<|message|>`, `<|channel|>`, special). Against a server on it, each chat completion
(nudged by logit_bias to emit the markup) must return, as `message.reasoning_content` and
`message.content`, the split the harmony rules give for the tokens it returned (final
channel: content; other channels: reasoning), streamed deltas adding up to the same;
at least one completion must have both. Usage:

    python3 tests/python/harmony_client_check.py --make-model /tmp/harmony-test
    python3 tests/python/harmony_client_check.py --base-url http://127.0.0.1:8000/v1 --model harmony-test
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

MARKUP = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>"]


def make_model(out: Path):
    src = Path(__file__).resolve().parents[2] / "models/tiny-shakespeare-moe"
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copy(f, out / f.name)
    t = json.loads((out / "tokenizer.json").read_text())
    vocab = t["model"]["vocab"]
    n = len(vocab)
    for name, i in zip(MARKUP, range(n - 4, n)):
        old = next(k for k, v in vocab.items() if v == i)
        del vocab[old]
        vocab[name] = i
        parts = lambda m: m.split(" ") if isinstance(m, str) else list(m)
        t["model"]["merges"] = [m for m in t["model"]["merges"]
                                if "".join(parts(m)) != old and old not in parts(m)]
        t["added_tokens"].append({"id": i, "content": name, "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True})
    (out / "tokenizer.json").write_text(json.dumps(t))
    print(f"wrote {out}; markup ids {list(range(n - 4, n))}")


def split(tokens):
    content, reasoning, state, name = "", "", "content", ""
    for t in tokens:
        if t == "<|channel|>":
            state, name = "channel", ""
        elif t == "<|message|>":
            state = "reasoning" if state == "channel" and (name.split() or [""])[0] != "final" else "content"
        elif t in ("<|start|>", "<|end|>"):
            state = "header"
        elif state == "content":
            content += t
        elif state == "reasoning":
            reasoning += t
        elif state == "channel":
            name += t
    return content, reasoning


def check(base_url, model, api_key):
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key or "none")
    vocab_size = 2048
    bias = {str(i): b for i, b in zip(range(vocab_size - 4, vocab_size), [3, 3, 7, 7])}
    both = 0
    for seed in range(32):
        kw = dict(model=model, messages=[{"role": "user", "content": "Speak, what is the question?"}],
                  max_tokens=48, temperature=1.0, seed=seed, logit_bias=bias)
        r = client.chat.completions.create(logprobs=True, **kw)
        msg = r.choices[0].message
        tokens = [c.token for c in r.choices[0].logprobs.content]
        content, reasoning = split(tokens)
        got_reasoning = getattr(msg, "reasoning_content", None)
        assert msg.content == content, f"seed {seed}: content {msg.content!r} != {content!r}"
        assert got_reasoning == reasoning, f"seed {seed}: reasoning_content {got_reasoning!r} != {reasoning!r}"
        sc, sr = "", ""
        for chunk in client.chat.completions.create(stream=True, **kw):
            if chunk.choices:
                d = chunk.choices[0].delta
                sc += d.content or ""
                sr += getattr(d, "reasoning_content", None) or ""
        assert (sc, sr) == (content, reasoning), f"seed {seed}: streamed ({sc!r}, {sr!r})"
        both += bool(content) and bool(reasoning)
    assert both > 0, "no completion had both channels: the check proves nothing"
    print(f"PASS harmony: content and reasoning_content split as the harmony rules give ({both} of 32 with both)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--make-model", type=Path)
    ap.add_argument("--base-url")
    ap.add_argument("--model", default="harmony-test")
    ap.add_argument("--api-key")
    a = ap.parse_args()
    if a.make_model:
        make_model(a.make_model)
        return
    try:
        check(a.base_url, a.model, a.api_key)
    except AssertionError as e:
        print(f"FAIL harmony: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
