#!/usr/bin/env python3
"""O_DIRECT read rate of a file at several queue depths (threads with reads in flight),
as the disk tier reads experts: blocks of --block-mib, --gb in all per depth, each depth
over its own region of the file (so nothing is read twice). Prints GB/s per depth.

usage: disk_read_rate.py FILE [--depths 1,2,4,8] [--block-mib 6] [--gb 1.2]
(FILE must hold len(depths) * gb bytes; e.g. a benchmark model file)
"""

import argparse
import mmap
import os
import threading
import time


def read_blocks(path, offset, count, size):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
    try:
        for i in range(count):
            os.preadv(fd, [buf], offset + i * size)
    finally:
        os.close(fd)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("--depths", default="1,2,4,8")
    ap.add_argument("--block-mib", type=int, default=6)
    ap.add_argument("--gb", type=float, default=1.2)
    a = ap.parse_args()
    size = a.block_mib * 2**20
    depths = [int(d) for d in a.depths.split(",")]
    per_depth = int(a.gb * 1e9) // size * size
    if len(depths) * per_depth > os.path.getsize(a.file):
        raise SystemExit(f"{a.file} is smaller than {len(depths)} x {a.gb} GB")
    for k, qd in enumerate(depths):
        count = per_depth // size // qd
        base = k * per_depth
        t = time.monotonic()
        threads = [threading.Thread(target=read_blocks, args=(a.file, base + j * count * size, count, size))
                   for j in range(qd)]
        [th.start() for th in threads]
        [th.join() for th in threads]
        print(f"queue depth {qd}: {count * qd * size / (time.monotonic() - t) / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
