#!/usr/bin/env python3
"""An independent MXFP4 reference for mfx's tests.

Dequantizes every `*_blocks`/`*_scales` pair of a hub checkpoint the way
transformers does (`integrations/mxfp4.py`, `convert_moe_packed_tensors`:
low nibble = even element, `ldexp(FP4_VALUES[code], scale - 127)`, then
`transpose(1, 2)` to transformers' `[experts, in, out]` parameter layout),
written from that description with numpy only (no torch, no mfx code), and
prints for each tensor the shape of the result and the sha256 of its float32
little-endian bytes.

    python3 scripts/mxfp4_reference.py ../shared/fixtures/gpt_oss_mxfp4 \
        > runtime/tests/data/gpt_oss_mxfp4_dequant.json

runtime/tests/mxfp4.rs recomputes the same digests from mfx's reader and
scalar dequantizer and requires them to be equal.
"""

import hashlib
import json
import pathlib
import struct
import sys

import numpy as np

FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)


def read_tensors(path):
    """name -> numpy array for every U8 tensor of one safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "U8":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[base + a:base + b], dtype=np.uint8).reshape(info["shape"])
    return out


def convert_moe_packed_tensors(blocks, scales):
    """transformers' dequantization, in float32 (every value is exact)."""
    exp = scales.astype(np.int32) - 127
    assert blocks.shape[:-1] == scales.shape
    *prefix, g, b = blocks.shape
    rows = int(np.prod(prefix)) * g
    blk = blocks.reshape(rows, b)
    exp = exp.reshape(rows, 1)
    out = np.empty((rows, b * 2), dtype=np.float32)
    out[:, 0::2] = FP4_VALUES[blk & 0x0F]
    out[:, 1::2] = FP4_VALUES[blk >> 4]
    out = np.ldexp(out, exp).astype(np.float32)
    out = out.reshape(*prefix, g * b * 2)
    return np.ascontiguousarray(np.swapaxes(out, 1, 2))


def main():
    root = pathlib.Path(sys.argv[1])
    tensors = {}
    for f in sorted(root.glob("*.safetensors")):
        tensors.update(read_tensors(f))
    result = {}
    for name in sorted(tensors):
        if not name.endswith("_blocks"):
            continue
        prefix = name[: -len("_blocks")]
        deq = convert_moe_packed_tensors(tensors[name], tensors[prefix + "_scales"])
        result[prefix] = {
            "shape": list(deq.shape),
            "sha256": hashlib.sha256(deq.astype("<f4").tobytes()).hexdigest(),
            "abs_sum": float(np.abs(deq.astype(np.float64)).sum()),
        }
    json.dump(
        {
            "source": "scripts/mxfp4_reference.py (numpy re-implementation of "
            "transformers.integrations.mxfp4.convert_moe_packed_tensors)",
            "layout": "[experts, in, out] float32 little-endian, as transformers returns it",
            "tensors": result,
        },
        sys.stdout,
        indent=1,
    )
    print()


if __name__ == "__main__":
    main()
