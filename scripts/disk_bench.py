#!/usr/bin/env python3
"""Cold-start decoding from disk, moe-serve beside llama.cpp, on one GGUF file.

Each run starts with the page cache dropped (as root: `sync`, then 3 written
to /proc/sys/vm/drop_caches; this script is the only thing in the repo that
does so, and says so before it starts), then generates TOKENS tokens greedily
from one prompt, ignoring end-of-sequence tokens, on THREADS threads:

- moe-serve: `moe-serve --threads T generate --expert-cache B ...` at expert
  budgets of 25%, 50% and 75% of what fits (MemAvailable after the drop,
  less the non-expert weights and 1 GiB of headroom), for each policy and
  predictor asked for (`--configs policy:predictor,...`);
- llama.cpp: `llama-completion -t T -n TOKENS --ignore-eos` with its default
  memory-mapped loading.

Measured per run: decode tokens/s after the first token (from each tool's
own report), time to first token (the wall-clock time of the whole process
less its decode time: loading, warm-up and prompt included, as a user waits
for them on a cold start), bytes read from disk (the block-device reads of
`getrusage`, `ru_inblock` in 512-byte units, per generated token) and peak
RSS (`ru_maxrss`, which counts a memory-mapped file's resident pages). The
runs alternate between the engines, `--rounds` times.

`--expert-cache` values can also be given as they are (`--as-given 50%,all`:
percentages of all experts, `all` for the fully resident run), for a model
that fits in memory.

usage: disk_bench.py --model FILE.gguf [--tokens 64] [--threads 2] [--rounds 1]
                     [--budgets 0.25,0.5,0.75 | --as-given 50%,all] [--configs lru:none,predictive:lookahead]
                     [--moe target/release/moe-serve] [--llama-bin DIR] [--extra "--disk-io release"]
needs: Linux, root (for drop_caches), numpy and the gguf package (for the
non-expert size), a llama.cpp build (../shared/PERFORMANCE.md) unless --no-llama
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def mem_available():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no MemAvailable in /proc/meminfo")


def non_expert_bytes(path):
    try:
        import gguf
    except ImportError:
        raise SystemExit("needs the gguf package: pip install gguf numpy")
    r = gguf.GGUFReader(path)
    return sum(int(t.n_bytes) for t in r.tensors if "_exps." not in t.name)


def run_measured(cmd):
    """Runs cmd from a cold page cache with its resource usage measured;
    returns (stdout, stderr, wall seconds, rusage)."""
    import tempfile

    drop_caches()
    with tempfile.TemporaryFile("w+", errors="replace") as out, tempfile.TemporaryFile("w+", errors="replace") as err:
        t = time.monotonic()
        p = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.monotonic() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    return stdout, stderr, wall, ru


def ours(a, budget, policy, predictor):
    cmd = [a.moe, "--threads", str(a.threads), "generate", "--model", a.model, "--prompt", PROMPT,
           "--max-tokens", str(a.tokens), "--temperature", "0", "--ignore-eos",
           "--expert-cache", budget, "--expert-policy", policy, "--predictor", predictor]
    cmd += a.extra.split()
    stdout, text, wall, ru = run_measured(cmd)
    m = re.search(r"first token after ([\d.]+)s; decode ([\d.]+) tok/s over the (\d+) tokens", text)
    if not m:
        sys.exit(f"no timing line in moe-serve's output:\n{text[-2000:]}")
    decode_tps, after = float(m.group(2)), int(m.group(3))
    return {"decode": decode_tps, "ttft": wall - after / decode_tps, "ru": ru, "wall": wall,
            "tokens": after + 1, "text": stdout}


def llama(a):
    cmd = [str(Path(a.llama_bin) / "llama-completion"), "-m", a.model, "-t", str(a.threads), "-n", str(a.tokens),
           "-p", PROMPT, "--ignore-eos", "--temp", "0", "-no-cnv", "--seed", "1"]
    _, text, wall, ru = run_measured(cmd)
    m = re.search(r"eval time =\s*([\d.]+) ms /\s*(\d+) runs", text)
    if not m:
        sys.exit(f"no eval time in llama.cpp's output:\n{text[-2000:]}")
    ms, runs = float(m.group(1)), int(m.group(2))
    return {"decode": runs / (ms / 1000), "ttft": wall - ms / 1000, "ru": ru, "wall": wall, "tokens": runs + 1,
            "text": None}


def row(name, config, budget, r, base):
    gb = 1e9
    read = r["ru"].ru_inblock * 512
    rss = r["ru"].ru_maxrss * 1024
    ratio = f"{r['decode'] / base:.2f}x" if base else "-"
    return (f"| {name} | {config} | {budget} | {r['decode']:.2f} | {ratio} | {r['ttft']:.1f} | "
            f"{read / gb:.1f} | {read / r['tokens'] / gb:.2f} | {rss / gb:.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--budgets", default="0.25,0.5,0.75", help="fractions of what fits in memory")
    ap.add_argument("--as-given", default=None, help="--expert-cache values passed as they are (50%%,all)")
    ap.add_argument("--configs", default="lru:none,predictive:lookahead,predictive:previous")
    ap.add_argument("--moe", default=str(ROOT / "target/release/moe-serve"))
    ap.add_argument("--llama-bin", default=os.environ.get("LLAMA_BIN", "/work/llama/build/bin"))
    ap.add_argument("--extra", default="", help="more moe-serve generate flags")
    ap.add_argument("--no-llama", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: each run starts from a dropped page cache")
    print("WARNING: this benchmark drops the kernel's page cache (sync; echo 3 > /proc/sys/vm/drop_caches) "
          "before every run", file=sys.stderr)
    path = Path(a.model)
    size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
    drop_caches()
    avail = mem_available()
    fits = None if a.as_given else avail - non_expert_bytes(a.model) - 2**30
    print(f"{a.model}: {size / 1e9:.1f} GB; MemAvailable after dropping the page cache {avail / 1e9:.1f} GB"
          + (f"; expert bytes that fit {fits / 1e9:.1f} GB" if fits else ""), file=sys.stderr)
    configs = [c.split(":") for c in a.configs.split(",")]
    if a.as_given:
        budgets = [(b, b) for b in a.as_given.split(",")]
    else:
        budgets = [(f"{int(fits * float(f))}B", f"{float(f):.0%} ({fits * float(f) / 1e9:.1f} GB)")
                   for f in a.budgets.split(",")]
    rows, texts = [], []
    for rnd in range(a.rounds):
        base = None
        if not a.no_llama:
            print(f"round {rnd + 1}: llama.cpp", file=sys.stderr)
            r = llama(a)
            base = r["decode"]
            rows.append(row("llama.cpp", "mmap (default)", "page cache", r, None))
        for budget, label in budgets:
            for policy, predictor in configs:
                if budget == "all" and (policy, predictor) != tuple(configs[0]):
                    continue  # nothing to offload: one resident run
                print(f"round {rnd + 1}: moe-serve {policy}+{predictor} at {label}", file=sys.stderr)
                r = ours(a, budget, policy, predictor)
                texts.append(r["text"])
                config = "resident" if budget == "all" else f"{policy} + {predictor}"
                rows.append(row("moe-serve", config, label, r, base))
    print(f"\n{path.name} ({size / 1e9:.1f} GB), {a.threads} threads, {a.tokens} tokens from a "
          f"cold page cache, MemAvailable {avail / 1e9:.1f} GB\n")
    print("| engine | policy + predictor | expert budget | decode tok/s | vs llama.cpp | time to first token s "
          "| GB read | GB read per token | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    same = len(set(texts)) <= 1
    print(f"\nmoe-serve's greedy text identical across all {len(texts)} runs: {same}")


if __name__ == "__main__":
    main()
