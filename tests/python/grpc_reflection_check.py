#!/usr/bin/env python3
"""moe-serve's gRPC server reflection, as a client without the .proto sees it.

grpcio-reflection's ProtoReflectionDescriptorDatabase speaks only
grpc.reflection.v1alpha (as do older grpcurl and Postman versions). This check
discovers the services through it, builds the request and response classes of
moe.v1.Generation/Generate from the discovered descriptors alone, calls Generate
with them, and checks the answer.

Usage:
    python3 tests/python/grpc_reflection_check.py --target 127.0.0.1:PORT \
        [--model tiny-shakespeare-moe] [--api-key KEY]

Prints one PASS or FAIL line per check; exits 1 if any failed.
Packages: tests/python/requirements.txt (grpcio, grpcio-reflection, protobuf).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

RPC_TIMEOUT = 120.0


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the API key to every call, reflection's streams included."""

    def __init__(self, metadata):
        self.metadata = metadata

    def _details(self, details):
        return details._replace(metadata=list(details.metadata or []) + self.metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="host:port of the gRPC server")
    parser.add_argument("--model", default="tiny-shakespeare-moe", help="served model name")
    parser.add_argument("--api-key", default=None, help="sent as 'authorization: Bearer KEY' metadata")
    args = parser.parse_args()

    channel = grpc.insecure_channel(args.target)
    if args.api_key:
        channel = grpc.intercept_channel(channel, _Metadata([("authorization", f"Bearer {args.api_key}")]))
    failures = 0

    def check(name: str, ok: bool, detail: str) -> None:
        nonlocal failures
        failures += 0 if ok else 1
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)

    try:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = sorted(db.get_services())
        check("1 services (v1alpha)", "moe.v1.Generation" in services and "grpc.health.v1.Health" in services,
              f"{services}")
        pool = descriptor_pool.DescriptorPool(db)
        service = pool.FindServiceByName("moe.v1.Generation")
        method = service.FindMethodByName("Generate")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        methods = sorted(m.name for m in service.methods)
        check("2 descriptors", method.input_type.full_name == "moe.v1.GenerateRequest" and "GenerateStream" in methods,
              f"Generation methods {methods}")
        generate = channel.unary_unary(
            f"/{service.full_name}/{method.name}",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        request = request_cls(text="ROMEO:", max_tokens=8, seed=1)
        response = generate(request, timeout=RPC_TIMEOUT)
        text = response.choices[0].text if response.choices else ""
        check("3 Generate through discovered descriptors",
              response.model == args.model and len(response.choices) == 1 and len(text) > 0
              and response.usage.completion_tokens > 0,
              f"model {response.model!r}, text {text!r}, {response.usage.completion_tokens} tokens")
    except grpc.RpcError as err:
        failures += 1
        print(f"FAIL unexpected RPC error {err.code().name}: {err.details()}", flush=True)
    finally:
        channel.close()
    print(f"{'all checks passed' if failures == 0 else f'{failures} failed'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
