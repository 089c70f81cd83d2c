#!/usr/bin/env python3
"""Read speed of the disk holding the models, bypassing the page cache.

Why: past RAM, decode speed is bounded by how fast expert bytes come off the
disk, and mmap faults are small random reads, not a sequential stream, so both
numbers matter. O_DIRECT keeps the page cache out of it.

Usage: bench_disk.py FILE_OR_DIR  (uses the largest file, >= 64 MiB preferred)
Prints JSON: sequential 4 MiB reads and random 4 KiB / 64 KiB / 1 MiB reads at
queue depth 1.
"""
from __future__ import annotations

import json
import mmap
import os
import random
import sys
import time
from pathlib import Path


def pick(path: Path) -> Path:
    if path.is_file():
        return path
    files = [p for p in path.rglob("*") if p.is_file()]
    if not files:
        sys.exit(f"bench_disk.py: {path}: no files")
    return max(files, key=lambda p: p.stat().st_size)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: bench_disk.py FILE_OR_DIR")
    f = pick(Path(sys.argv[1]))
    fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
    size = os.fstat(fd).st_size
    buf = mmap.mmap(-1, 4 << 20)  # page-aligned, as O_DIRECT requires
    out = {"file": str(f), "file_bytes": size}
    t0, n = time.perf_counter(), 0
    off = 0
    while time.perf_counter() - t0 < 3 and off + (4 << 20) <= size:
        n += os.preadv(fd, [buf], off)
        off += 4 << 20
    out["seq_4M_MiBps"] = round(n / (time.perf_counter() - t0) / 2**20, 1)
    rng = random.Random(0)
    for bs in (4096, 65536, 1 << 20):
        if size < 2 * bs:
            continue
        view = memoryview(buf)[:bs]
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < 2:
            os.preadv(fd, [view], rng.randrange(0, size - bs) // 4096 * 4096)
            k += 1
        dt = time.perf_counter() - t0
        out[f"rand_{bs // 1024}K_iops"] = round(k / dt)
        out[f"rand_{bs // 1024}K_MiBps"] = round(k * bs / dt / 2**20, 1)
    os.close(fd)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
