#!/usr/bin/env python3
"""Reference dequantization (and Q8_0 quantization) fixtures from the `gguf`
Python package, for the kernels' bit-exactness tests.

    pip install numpy gguf==0.19.0
    python scripts/gen_quant_fixtures.py --out kernels/tests/fixtures

Writes, for each format, `<name>.blocks` (random blocks: raw bytes) and
`<name>.values` (what `gguf.quants.dequantize` makes of them: little-endian
f32), plus `q8_0_input.values` / `q8_0_input.blocks` (random f32 rows and
`gguf.quants.quantize` of them). Deterministic (fixed seed).
"""
import argparse
import pathlib

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES

FORMATS = {
    "q8_0": T.Q8_0,
    "q4_0": T.Q4_0,
    "q4_1": T.Q4_1,
    "q5_0": T.Q5_0,
    "q5_1": T.Q5_1,
    "q4_k": T.Q4_K,
    "q5_k": T.Q5_K,
    "q6_k": T.Q6_K,
    "mxfp4": T.MXFP4,
}
# byte offsets of each block's f16 scales
F16_AT = {"q8_0": [0], "q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208], "mxfp4": []}
BLOCKS = 24


def random_blocks(name, rng):
    qtype = FORMATS[name]
    _, size = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(BLOCKS, size), dtype=np.uint8)
    for i in range(BLOCKS):
        for off in F16_AT[name]:
            if i == 0:
                d = np.float16(0.0)
            elif i == 1:
                d = np.float16(3e-6)  # subnormal f16
            else:
                d = np.float16(rng.normal() * 0.01)
            b[i, off:off + 2] = np.frombuffer(d.tobytes(), dtype=np.uint8)
        if name == "mxfp4":
            # exponents around 2^-5, plus the two subnormal encodings
            b[i, 0] = i % 2 if i < 2 else 118 + rng.integers(0, 12)
    return b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=pathlib.Path)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261206)
    for name, qtype in FORMATS.items():
        blocks = random_blocks(name, rng)
        values = quants.dequantize(blocks.reshape(-1), qtype).astype("<f4")
        (args.out / f"{name}.blocks").write_bytes(blocks.tobytes())
        (args.out / f"{name}.values").write_bytes(values.tobytes())
        print(name, blocks.shape, values.shape)
    x = (rng.normal(size=(4, 256)) * 0.05).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    x[1, 5] = 0.5 / 127 * 3  # values on rounding ties are likely with few distinct scales
    q = quants.quantize(x, T.Q8_0)
    (args.out / "q8_0_input.values").write_bytes(x.astype("<f4").tobytes())
    (args.out / "q8_0_input.blocks").write_bytes(q.tobytes())


if __name__ == "__main__":
    main()
