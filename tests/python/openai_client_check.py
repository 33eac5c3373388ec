#!/usr/bin/env python3
"""Checks a running moe-serve with the official OpenAI Python client.

Each check prints one line, PASS or FAIL with the reason; the exit status is non-zero if any
check failed. Usage:

    python3 tests/python/openai_client_check.py --base-url http://127.0.0.1:8000/v1 \
        --model tiny-shakespeare-moe [--api-key KEY]
"""

import argparse
import sys
import traceback

import openai

CHAT_MESSAGES = [
    {"role": "system", "content": "You are a playwright. Answer in verse."},
    {"role": "user", "content": "Speak of the king."},
]
PROMPT = "ROMEO:"
MAX_TOKENS = 16
FINISH_REASONS = {"stop", "length"}
ENVELOPE_KEYS = {"message", "type", "param", "code"}


def check_usage(usage, what):
    assert usage is not None, f"{what}: no usage"
    assert usage.prompt_tokens > 0, f"{what}: usage.prompt_tokens={usage.prompt_tokens}"
    assert usage.completion_tokens > 0, f"{what}: usage.completion_tokens={usage.completion_tokens}"


def check_models(client, model):
    ids = [m.id for m in client.models.list()]
    assert model in ids, f"{model!r} not in models list {ids}"
    return f"models.list() contains {model!r} ({len(ids)} model(s))"


def chat_greedy(client, model):
    return client.chat.completions.create(
        model=model, messages=CHAT_MESSAGES, max_tokens=MAX_TOKENS, temperature=0
    )


def completion_greedy(client, model):
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)


def check_chat(client, model):
    resp = chat_greedy(client, model)
    assert len(resp.choices) == 1, f"expected 1 choice, got {len(resp.choices)}"
    choice = resp.choices[0]
    content = choice.message.content
    assert content, f"empty content: {content!r}"
    assert choice.finish_reason in FINISH_REASONS, f"finish_reason={choice.finish_reason!r}"
    check_usage(resp.usage, "chat")
    return (
        f"chat completion: {len(content)} chars, finish_reason={choice.finish_reason}, "
        f"usage={resp.usage.prompt_tokens}+{resp.usage.completion_tokens}"
    )


def check_completion(client, model):
    first = completion_greedy(client, model)
    assert len(first.choices) == 1, f"expected 1 choice, got {len(first.choices)}"
    choice = first.choices[0]
    assert choice.text, f"empty text: {choice.text!r}"
    assert choice.finish_reason in FINISH_REASONS, f"finish_reason={choice.finish_reason!r}"
    check_usage(first.usage, "completion")
    second = completion_greedy(client, model)
    assert second.choices[0].text == choice.text, (
        f"greedy completion not deterministic: {choice.text!r} vs {second.choices[0].text!r}"
    )
    return (
        f"completion: {choice.text!r}, finish_reason={choice.finish_reason}, "
        f"usage={first.usage.prompt_tokens}+{first.usage.completion_tokens}, repeat identical"
    )


def reassemble(stream, get_text):
    """Joins the streamed text; returns (text, finish_reason, final usage chunk's usage)."""
    parts, finish, usage, after_usage = [], None, None, 0
    for chunk in stream:
        if usage is not None:
            after_usage += 1
        if chunk.usage is not None:
            usage = chunk.usage
            assert not chunk.choices, f"usage chunk has choices: {chunk.choices}"
        for choice in chunk.choices:
            assert choice.index == 0, f"unexpected choice index {choice.index}"
            text = get_text(choice)
            if text:
                parts.append(text)
            if choice.finish_reason is not None:
                finish = choice.finish_reason
    assert usage is not None, "stream did not end with a usage chunk"
    assert after_usage == 0, f"{after_usage} chunk(s) after the usage chunk"
    return "".join(parts), finish, usage


def check_streaming(client, model):
    ref_chat = chat_greedy(client, model)
    stream = client.chat.completions.create(
        model=model,
        messages=CHAT_MESSAGES,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = reassemble(stream, lambda c: c.delta.content if c.delta else None)
    want = ref_chat.choices[0].message.content
    assert text == want, f"streamed chat {text!r} != non-streamed {want!r}"
    assert finish == ref_chat.choices[0].finish_reason, (
        f"streamed chat finish_reason {finish!r} != {ref_chat.choices[0].finish_reason!r}"
    )
    check_usage(usage, "streamed chat")
    assert usage.completion_tokens == ref_chat.usage.completion_tokens, (
        f"streamed chat completion_tokens {usage.completion_tokens} != {ref_chat.usage.completion_tokens}"
    )

    ref_cmpl = completion_greedy(client, model)
    stream = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    ctext, cfinish, cusage = reassemble(stream, lambda c: c.text)
    want = ref_cmpl.choices[0].text
    assert ctext == want, f"streamed completion {ctext!r} != non-streamed {want!r}"
    assert cfinish == ref_cmpl.choices[0].finish_reason, (
        f"streamed completion finish_reason {cfinish!r} != {ref_cmpl.choices[0].finish_reason!r}"
    )
    check_usage(cusage, "streamed completion")
    assert cusage.completion_tokens == ref_cmpl.usage.completion_tokens, (
        f"streamed completion completion_tokens {cusage.completion_tokens} != {ref_cmpl.usage.completion_tokens}"
    )
    return (
        f"streaming chat and completion reassemble to the greedy text and end with usage "
        f"({usage.completion_tokens} and {cusage.completion_tokens} tokens)"
    )


def expect_error(exc_type, fn):
    try:
        fn()
    except exc_type as e:
        return e
    except openai.APIStatusError as e:
        raise AssertionError(f"expected {exc_type.__name__}, got {type(e).__name__} (HTTP {e.status_code}): {e}")
    raise AssertionError(f"expected {exc_type.__name__}, but the request succeeded")


def check_errors(client, model):
    unknown = "no-such-model-for-moe-serve"
    e404 = expect_error(
        openai.NotFoundError,
        lambda: client.completions.create(model=unknown, prompt=PROMPT, max_tokens=4),
    )
    e400 = expect_error(
        openai.BadRequestError,
        lambda: client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=-1),
    )
    for e in (e404, e400):
        try:
            envelope = e.response.json()
        except ValueError:
            envelope = None
        err = envelope.get("error") if isinstance(envelope, dict) else None
        assert isinstance(err, dict) and ENVELOPE_KEYS <= set(err) and err.get("message"), (
            f"HTTP {e.status_code} body is not an OpenAI error envelope: {e.response.text[:300]!r}"
        )
    return f"unknown model -> NotFoundError ({e404.status_code}), temperature=-1 -> BadRequestError ({e400.status_code})"


def check_n(client, model):
    resp = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=1, seed=5, n=2)
    assert len(resp.choices) == 2, f"expected 2 choices, got {len(resp.choices)}"
    assert sorted(c.index for c in resp.choices) == [0, 1], f"choice indices {[c.index for c in resp.choices]}"
    for c in resp.choices:
        assert c.finish_reason in FINISH_REASONS, f"choice {c.index}: finish_reason={c.finish_reason!r}"
    return "n=2 (temperature=1, seed=5) returns 2 choices"


CHECKS = [
    ("1 models", check_models),
    ("2 chat", check_chat),
    ("3 completion", check_completion),
    ("4 streaming", check_streaming),
    ("5 errors", check_errors),
    ("6 n=2", check_n),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="tiny-shakespeare-moe")
    ap.add_argument("--api-key", default="unused")
    ap.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    args = ap.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=args.timeout, max_retries=0)
    print(f"openai {openai.__version__} against {args.base_url} model={args.model}")
    failed = 0
    for name, check in CHECKS:
        try:
            detail = check(client, args.model)
            print(f"PASS [{name}] {detail}", flush=True)
        except AssertionError as e:
            failed += 1
            print(f"FAIL [{name}] {e}", flush=True)
        except Exception as e:  # noqa: BLE001 - any client error is a failed check
            failed += 1
            print(f"FAIL [{name}] {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(file=sys.stderr)
    print(f"{len(CHECKS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
