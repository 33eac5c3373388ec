#!/usr/bin/env python3
"""Memory and latency of concurrent huge prompts, for each moe-serve binary given.

Starts each binary on the built-in model (default limits: 2 MiB bodies), sends N
concurrent completions whose prompt is just under the body limit (about 1.9 MB of
text), and prints the server's idle VmRSS, its peak VmRSS (VmHWM) over the burst, the
statuses and the slowest answer. Binaries run one after another in the same call.

Usage: scripts/big_prompts.py [--clients 64] [--model DIR] BIN [BIN ...]
(--model defaults to this repository's models/tiny-shakespeare-moe, so binaries built
elsewhere find the model too)
"""
import argparse
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def status_mib(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"no {field} for {pid}")


def measure(binary, clients, model):
    port, gport = free_port(), free_port()
    while gport == port:
        gport = free_port()
    p = subprocess.Popen([binary, "serve", "--model", model, "--port", str(port), "--grpc-port", str(gport)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                    break
            except Exception:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"{binary} did not become healthy")
        time.sleep(0.5)
        idle = status_mib(p.pid, "VmRSS:")
        body = json.dumps({"prompt": "hello world " * (1_900_000 // 12), "max_tokens": 4}).encode()
        statuses, latencies = [], []

        def one():
            t = time.time()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"content-type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=600)
                statuses.append("200")
            except urllib.error.HTTPError as e:
                statuses.append(str(e.code))
            except Exception as e:
                statuses.append(type(e).__name__)
            latencies.append(time.time() - t)

        threads = [threading.Thread(target=one) for _ in range(clients)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = status_mib(p.pid, "VmHWM:")
        print(f"{binary}: {clients} concurrent {len(body) / 1e6:.2f} MB prompts: idle VmRSS {idle} MiB, "
              f"peak {peak} MiB (+{peak - idle} MiB); statuses {sorted(set(statuses))}; slowest "
              f"{max(latencies):.2f} s; all in {time.time() - t0:.2f} s", flush=True)
    finally:
        p.terminate()
        p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "models/tiny-shakespeare-moe"))
    ap.add_argument("binaries", nargs="+")
    args = ap.parse_args()
    for b in args.binaries:
        measure(b, args.clients, args.model)


if __name__ == "__main__":
    main()
