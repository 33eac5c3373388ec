#!/usr/bin/env python3
"""End-to-end check of moe-serve's gRPC API with an independent Python client.

The client is generated from proto/moe/v1/moe.proto only: at start, grpc_tools.protoc
writes the Python stubs into a temporary directory (nothing generated is committed).
Health checking uses the grpc.health.v1 stubs shipped with grpcio-health-checking.

Usage:
    python3 tests/python/grpc_client_check.py --target 127.0.0.1:PORT \
        [--model tiny-shakespeare-moe] [--api-key KEY] [--proto PATH/TO/moe.proto]

Each check prints one PASS or FAIL line; the exit status is 1 if any check failed.
Packages: tests/python/requirements.txt (grpcio, grpcio-tools, grpcio-health-checking).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
DEFAULT_PROTO = HERE.parent.parent / "proto" / "moe" / "v1" / "moe.proto"

PROMPT = "ROMEO:"
MAX_TOKENS = 16
LONG_MAX_TOKENS = 400  # clamped to the model's context length (see long_max_tokens)
ROUND_TRIP_TEXT = "To be, or not"
RPC_TIMEOUT = 120.0  # seconds; bounds every call that is not about deadlines
HEALTH_WAIT = 60.0
DEADLINE_TRIES = 5


# --------------------------------------------------------------------------- stubs


def generate_stubs(proto: Path, out_dir: Path):
    """Runs grpc_tools.protoc on moe.proto into out_dir and imports the result."""
    from grpc_tools import protoc

    proto = proto.resolve()
    # moe.proto lives at <root>/moe/v1/moe.proto and declares package moe.v1, so the
    # include root is two levels up and the generated modules are moe.v1.moe_pb2(_grpc).
    root = proto.parent.parent.parent
    rel = proto.relative_to(root)
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(proto),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"grpc_tools.protoc failed with status {rc} on {proto} (its message is on stderr)")
    sys.path.insert(0, str(out_dir))
    mod = ".".join(rel.with_suffix("").parts)  # moe.v1.moe
    pb2 = importlib.import_module(mod + "_pb2")
    pb2_grpc = importlib.import_module(mod + "_pb2_grpc")
    return pb2, pb2_grpc


# --------------------------------------------------------------------------- helpers


class CheckFailed(Exception):
    pass


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def rpc_error_text(err: grpc.RpcError) -> str:
    try:
        return f"{err.code().name}: {err.details()!r}"
    except Exception:  # pragma: no cover - not a grpc.Call
        return repr(err)


def expect_rpc_error(fn, code: grpc.StatusCode, what: str) -> grpc.RpcError:
    try:
        result = fn()
    except grpc.RpcError as err:
        expect(
            err.code() == code,
            f"{what}: expected {code.name}, got {rpc_error_text(err)}",
        )
        return err
    raise CheckFailed(f"{what}: expected {code.name}, but the call succeeded: {str(result)[:200]!r}")


class Checker:
    def __init__(self, args, pb2, pb2_grpc, health_pb2, health_pb2_grpc):
        self.args = args
        self.pb2 = pb2
        self.health_pb2 = health_pb2
        self.channel = grpc.insecure_channel(args.target)
        self.stub = pb2_grpc.GenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (
            [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
        )
        self.failures = 0
        self.passes = 0
        self.context_length = None  # filled by check_models
        self.unary_text = None  # filled by check_generate

    # -- runner

    def run(self, name: str, fn) -> None:
        try:
            detail = fn()
        except CheckFailed as exc:
            self.failures += 1
            print(f"FAIL {name}: {exc}", flush=True)
        except grpc.RpcError as err:
            self.failures += 1
            print(f"FAIL {name}: unexpected RPC error {rpc_error_text(err)}", flush=True)
        except Exception as exc:  # a bug in the check or an unexpected response
            self.failures += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
        else:
            self.passes += 1
            print(f"PASS {name}" + (f": {detail}" if detail else ""), flush=True)

    # -- request builders

    def request(self, max_tokens: int = MAX_TOKENS, **extra):
        fields = dict(
            model=self.args.model,
            text=PROMPT,
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
        )
        fields.update(extra)
        return self.pb2.GenerateRequest(**fields)

    def long_max_tokens(self) -> int:
        """400, or less if the model's context cannot hold the prompt plus 400 tokens."""
        if self.context_length:
            return max(1, min(LONG_MAX_TOKENS, self.context_length - 64))
        return LONG_MAX_TOKENS

    # -- checks

    def check_health(self) -> str:
        deadline = time.monotonic() + HEALTH_WAIT
        pending = {"": None, "moe.v1.Generation": None}
        serving = self.health_pb2.HealthCheckResponse.SERVING
        while True:
            for service in list(pending):
                try:
                    resp = self.health.Check(
                        self.health_pb2.HealthCheckRequest(service=service),
                        timeout=5.0,
                        metadata=self.metadata,
                    )
                except grpc.RpcError as err:
                    pending[service] = rpc_error_text(err)
                else:
                    status = self.health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
                    if resp.status == serving:
                        del pending[service]
                    else:
                        pending[service] = status
            if not pending:
                return 'services "" and "moe.v1.Generation" are SERVING'
            if time.monotonic() >= deadline:
                raise CheckFailed(
                    f"not SERVING after {HEALTH_WAIT:.0f} s: "
                    + ", ".join(f"{s!r} -> {st}" for s, st in pending.items())
                )
            time.sleep(0.5)

    def check_models(self) -> str:
        listed = self.stub.ListModels(
            self.pb2.ListModelsRequest(), timeout=RPC_TIMEOUT, metadata=self.metadata
        )
        names = [m.name for m in listed.models]
        expect(self.args.model in names, f"ListModels does not list {self.args.model!r}: {names}")
        from_list = next(m for m in listed.models if m.name == self.args.model)

        info = self.stub.ModelInfo(
            self.pb2.ModelInfoRequest(model=self.args.model),
            timeout=RPC_TIMEOUT,
            metadata=self.metadata,
        )
        default = self.stub.ModelInfo(
            self.pb2.ModelInfoRequest(), timeout=RPC_TIMEOUT, metadata=self.metadata
        )
        for label, m in (("ListModels", from_list), ("ModelInfo", info), ("ModelInfo(default)", default)):
            expect(m.name == self.args.model, f"{label}: name {m.name!r} != {self.args.model!r}")
            expect(m.architecture == "mixtral", f"{label}: architecture {m.architecture!r} != 'mixtral'")
            expect(m.num_experts > 0, f"{label}: num_experts {m.num_experts} is not > 0")
            expect(m.top_k > 0, f"{label}: top_k {m.top_k} is not > 0")
            expect(m.top_k <= m.num_experts, f"{label}: top_k {m.top_k} > num_experts {m.num_experts}")
            expect(m.context_length > 0, f"{label}: context_length {m.context_length} is not > 0")
            expect(m.vocab_size > 0, f"{label}: vocab_size {m.vocab_size} is not > 0")
        expect(from_list == info, f"ListModels entry differs from ModelInfo:\n{from_list}\nvs\n{info}")
        self.context_length = info.context_length
        return (
            f"{info.name}: {info.architecture}, {info.num_layers} layers "
            f"({info.num_moe_layers} MoE), {info.num_experts} experts, top_k {info.top_k}, "
            f"context {info.context_length}, vocab {info.vocab_size}"
        )

    def check_generate(self) -> str:
        pb2 = self.pb2
        resp = self.stub.Generate(self.request(), timeout=RPC_TIMEOUT, metadata=self.metadata)
        expect(len(resp.choices) == 1, f"expected 1 choice, got {len(resp.choices)}")
        c = resp.choices[0]
        expect(c.index == 0, f"choice index {c.index} != 0")
        expect(len(c.token_ids) == MAX_TOKENS, f"expected {MAX_TOKENS} token ids, got {len(c.token_ids)}")
        expect(
            c.finish_reason == pb2.FINISH_REASON_LENGTH,
            f"finish reason {pb2.FinishReason.Name(c.finish_reason)} != FINISH_REASON_LENGTH",
        )
        expect(c.text != "", "empty text")
        expect(resp.id != "", "empty request id")
        expect(resp.model == self.args.model, f"response model {resp.model!r} != {self.args.model!r}")

        u = resp.usage
        expect(resp.HasField("usage"), "no usage")
        expect(u.completion_tokens == MAX_TOKENS, f"usage.completion_tokens {u.completion_tokens} != {MAX_TOKENS}")
        expect(u.prompt_tokens > 0, f"usage.prompt_tokens {u.prompt_tokens} is not > 0")
        expect(
            u.total_tokens == u.prompt_tokens + u.completion_tokens,
            f"usage.total_tokens {u.total_tokens} != {u.prompt_tokens} + {u.completion_tokens}",
        )
        # A text prompt is tokenized with the model's special tokens, so the prompt count
        # must equal Tokenize with add_special_tokens.
        tok = self.stub.Tokenize(
            pb2.TokenizeRequest(model=self.args.model, text=PROMPT, add_special_tokens=True),
            timeout=RPC_TIMEOUT,
            metadata=self.metadata,
        )
        expect(
            u.prompt_tokens == len(tok.token_ids),
            f"usage.prompt_tokens {u.prompt_tokens} != Tokenize({PROMPT!r}, add_special_tokens) "
            f"length {len(tok.token_ids)}",
        )
        # The text is the detokenized ids (no stop strings here).
        detok = self.stub.Detokenize(
            pb2.DetokenizeRequest(model=self.args.model, token_ids=list(c.token_ids)),
            timeout=RPC_TIMEOUT,
            metadata=self.metadata,
        )
        expect(detok.text == c.text, f"Detokenize(token_ids) {detok.text!r} != text {c.text!r}")

        again = self.stub.Generate(self.request(), timeout=RPC_TIMEOUT, metadata=self.metadata)
        c2 = again.choices[0] if again.choices else None
        expect(c2 is not None, "second Generate returned no choice")
        expect(c2.text == c.text, f"greedy Generate is not repeatable: {c.text!r} then {c2.text!r}")
        expect(list(c2.token_ids) == list(c.token_ids), "greedy Generate gave different token ids")

        self.unary_text = c.text
        self.unary_ids = list(c.token_ids)
        self.unary_usage = (u.prompt_tokens, u.completion_tokens, u.total_tokens)
        return f"{len(c.token_ids)} tokens, LENGTH, usage {u.prompt_tokens}+{u.completion_tokens}={u.total_tokens}, text {c.text!r}"

    def check_stream(self) -> str:
        pb2 = self.pb2
        expect(self.unary_text is not None, "needs the unary Generate result (check 3 failed)")
        msgs = list(
            self.stub.GenerateStream(
                self.request(include_usage=True), timeout=RPC_TIMEOUT, metadata=self.metadata
            )
        )
        expect(msgs, "no messages")
        kinds = [m.WhichOneof("event") for m in msgs]
        expect(all(k is not None for k in kinds), f"a message without an event: {kinds}")
        ids = {m.id for m in msgs}
        expect(len(ids) == 1 and "" not in ids, f"request ids are not one non-empty id: {ids}")

        tokens = [m.token for m in msgs if m.WhichOneof("event") == "token"]
        finishes = [m.finish for m in msgs if m.WhichOneof("event") == "finish"]
        usages = [m.usage for m in msgs if m.WhichOneof("event") == "usage"]
        expect(len(tokens) == MAX_TOKENS, f"expected {MAX_TOKENS} token events, got {len(tokens)}")
        expect(len(finishes) == 1, f"expected 1 finish event, got {len(finishes)}")
        expect(len(usages) == 1, f"expected 1 usage event, got {len(usages)}")
        expect(kinds[-1] == "usage", f"the last message is {kinds[-1]!r}, not usage (order: {kinds})")
        expect(kinds[-2] == "finish", f"the finish event is not right before usage (order: {kinds})")
        expect(all(k == "token" for k in kinds[:-2]), f"token events after the finish: {kinds}")
        expect(all(t.index == 0 for t in tokens), "a token event with index != 0")

        f = finishes[0]
        expect(f.index == 0, f"finish index {f.index} != 0")
        expect(
            f.finish_reason == pb2.FINISH_REASON_LENGTH,
            f"finish reason {pb2.FinishReason.Name(f.finish_reason)} != FINISH_REASON_LENGTH",
        )
        text = "".join(t.text for t in tokens) + f.text
        expect(text == self.unary_text, f"reassembled stream text {text!r} != unary text {self.unary_text!r}")
        stream_ids = [t.token_id for t in tokens]
        expect(stream_ids == self.unary_ids, f"stream token ids {stream_ids} != unary {self.unary_ids}")
        u = usages[0]
        got = (u.prompt_tokens, u.completion_tokens, u.total_tokens)
        expect(got == self.unary_usage, f"stream usage {got} != unary usage {self.unary_usage}")
        return f"{len(tokens)} token events + finish + usage; text matches the unary text"

    def check_cancel(self) -> str:
        n = self.long_max_tokens()
        call = self.stub.GenerateStream(
            self.request(max_tokens=n), timeout=RPC_TIMEOUT, metadata=self.metadata
        )
        first = [next(call), next(call)]
        kinds = [m.WhichOneof("event") for m in first]
        expect(kinds == ["token", "token"], f"the first two messages are {kinds}, not two tokens")
        expect(call.cancel(), "call.cancel() returned False (the call had already ended)")
        code = call.code()
        expect(code == grpc.StatusCode.CANCELLED, f"after cancel() the call reports {code}, not CANCELLED")
        # Reading on must end with CANCELLED too, not with more tokens.
        try:
            extra = 0
            for _ in call:
                extra += 1
        except grpc.RpcError as err:
            expect(
                err.code() == grpc.StatusCode.CANCELLED,
                f"reading after cancel() raised {rpc_error_text(err)}, not CANCELLED",
            )
        else:
            raise CheckFailed(f"reading after cancel() ended normally after {extra} more messages")

        # The server must still serve normally afterwards.
        resp = self.stub.Generate(self.request(), timeout=RPC_TIMEOUT, metadata=self.metadata)
        expect(
            resp.choices and len(resp.choices[0].token_ids) == MAX_TOKENS,
            f"Generate after the cancel did not give {MAX_TOKENS} tokens: {resp}",
        )
        if self.unary_text is not None:
            expect(
                resp.choices[0].text == self.unary_text,
                f"Generate after the cancel gave {resp.choices[0].text!r}, not {self.unary_text!r}",
            )
        return f"stream of max_tokens {n} cancelled after 2 messages -> CANCELLED; Generate still works"

    def check_deadline(self) -> str:
        n = self.long_max_tokens()
        # The client's own deadline timer races the server's status: whichever status
        # arrives first is what the call reports, so a server that answers something else
        # than DEADLINE_EXCEEDED is only caught some of the time. Repeat to catch it.
        for i in range(DEADLINE_TRIES):
            expect_rpc_error(
                lambda: self.stub.Generate(self.request(max_tokens=n), timeout=0.05, metadata=self.metadata),
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"Generate(max_tokens {n}, timeout 0.05 s), try {i + 1} of {DEADLINE_TRIES}",
            )
        # And the server is still fine afterwards.
        resp = self.stub.Generate(self.request(), timeout=RPC_TIMEOUT, metadata=self.metadata)
        expect(
            resp.choices and len(resp.choices[0].token_ids) == MAX_TOKENS,
            f"Generate after the deadline did not give {MAX_TOKENS} tokens",
        )
        return f"Generate(max_tokens {n}, timeout 0.05 s) -> DEADLINE_EXCEEDED ({DEADLINE_TRIES} times)"

    def check_errors(self) -> str:
        err = expect_rpc_error(
            lambda: self.stub.Generate(
                self.request(temperature=5.0), timeout=RPC_TIMEOUT, metadata=self.metadata
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Generate(temperature 5)",
        )
        details = err.details() or ""
        expect(
            details.startswith("temperature"),
            f"INVALID_ARGUMENT details do not start with 'temperature': {details!r}",
        )
        err2 = expect_rpc_error(
            lambda: self.stub.Generate(
                self.request(model="nope"), timeout=RPC_TIMEOUT, metadata=self.metadata
            ),
            grpc.StatusCode.NOT_FOUND,
            "Generate(model 'nope')",
        )
        return f"temperature 5 -> INVALID_ARGUMENT {details!r}; model 'nope' -> NOT_FOUND {err2.details()!r}"

    def check_tokenize(self) -> str:
        pb2 = self.pb2
        tok = self.stub.Tokenize(
            pb2.TokenizeRequest(model=self.args.model, text=ROUND_TRIP_TEXT, add_special_tokens=False),
            timeout=RPC_TIMEOUT,
            metadata=self.metadata,
        )
        ids = list(tok.token_ids)
        expect(ids, f"Tokenize({ROUND_TRIP_TEXT!r}) gave no token ids")
        if self.context_length:
            expect(
                tok.max_model_len == self.context_length,
                f"max_model_len {tok.max_model_len} != ModelInfo.context_length {self.context_length}",
            )
        detok = self.stub.Detokenize(
            pb2.DetokenizeRequest(model=self.args.model, token_ids=ids),
            timeout=RPC_TIMEOUT,
            metadata=self.metadata,
        )
        expect(
            detok.text == ROUND_TRIP_TEXT,
            f"Detokenize(Tokenize({ROUND_TRIP_TEXT!r})) = {detok.text!r}",
        )
        return f"{ROUND_TRIP_TEXT!r} -> {ids} -> {detok.text!r}"

    def check_auth(self) -> str:
        """Only with --api-key: calls without or with a wrong key are UNAUTHENTICATED."""
        req = self.pb2.ModelInfoRequest(model=self.args.model)
        expect_rpc_error(
            lambda: self.stub.ModelInfo(req, timeout=RPC_TIMEOUT),
            grpc.StatusCode.UNAUTHENTICATED,
            "ModelInfo without authorization metadata",
        )
        expect_rpc_error(
            lambda: self.stub.ModelInfo(
                req, timeout=RPC_TIMEOUT, metadata=[("authorization", "Bearer wrong-" + self.args.api_key)]
            ),
            grpc.StatusCode.UNAUTHENTICATED,
            "ModelInfo with a wrong key",
        )
        return "no key and a wrong key -> UNAUTHENTICATED"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="host:port of the gRPC server, e.g. 127.0.0.1:50051")
    parser.add_argument("--model", default="tiny-shakespeare-moe", help="served model name")
    parser.add_argument("--api-key", default=None, help="sent as 'authorization: Bearer KEY' metadata")
    parser.add_argument("--proto", type=Path, default=DEFAULT_PROTO, help="path to moe/v1/moe.proto")
    args = parser.parse_args()

    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError as exc:
        print(f"error: grpcio-health-checking is not installed ({exc}); "
              f"pip install -r {HERE / 'requirements.txt'}", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="moe-grpc-stubs-"))
    try:
        try:
            pb2, pb2_grpc = generate_stubs(args.proto, tmp)
        except Exception as exc:
            print(f"FAIL generate stubs from {args.proto}: {exc}", flush=True)
            return 1
        print(f"generated stubs from {args.proto} into {tmp}", flush=True)

        checker = Checker(args, pb2, pb2_grpc, health_pb2, health_pb2_grpc)
        checks = [
            ("1 health", checker.check_health),
            ("2 ListModels/ModelInfo", checker.check_models),
            ("3 Generate", checker.check_generate),
            ("4 GenerateStream", checker.check_stream),
            ("5 cancel", checker.check_cancel),
            ("6 deadline", checker.check_deadline),
            ("7 errors", checker.check_errors),
            ("8 Tokenize/Detokenize", checker.check_tokenize),
        ]
        if args.api_key:
            checks.append(("9 auth", checker.check_auth))
        for name, fn in checks:
            checker.run(name, fn)
        checker.channel.close()
        print(f"{checker.passes} passed, {checker.failures} failed", flush=True)
        return 1 if checker.failures else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
