#!/usr/bin/env python3
"""Cost of checking blob checksums at load (issue 16), for docs/PERF.md.

Runs `mfx bench` on a streamed pack (`--ram 70M`: experts read on demand,
each hashed on its first read) and a fully pinned one (`--ram 80M`: every expert
loaded and hashed at open) of the bundled tiny model, with checking on (the
default) and off (`--no-verify-checksums`), interleaved so that machine load
hits both alike. Prints the median of each setting.

    python3 scripts/bench_verify_cost.py [--reps 7] [--threads 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mfx", default=str(ROOT / "target/release/mfx"))
    ap.add_argument("--model", default=str(ROOT / "models/tiny-qwen3-moe-coder-mlx-4bit"))
    ap.add_argument("--work", help="directory for the packs (reused if present)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="mfx-verify-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    rams = ["70M", "80M"]
    if not all((work / f"tiny-{r}.mfx").exists() for r in rams):
        subprocess.run([a.mfx, "prep", a.model, "--ram", ",".join(rams), "-o", str(work / "tiny-{ram}.mfx"),
                        "--no-card", "--quiet"], check=True)
    res: dict[tuple[str, bool], list[dict]] = {}
    for _ in range(a.reps):
        for ram in rams:
            for verify in (True, False):
                argv = [a.mfx, "-t", str(a.threads), "bench", str(work / f"tiny-{ram}.mfx"), "--ram", ram,
                        "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens), "--json"]
                if not verify:
                    argv.append("--no-verify-checksums")
                out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
                res.setdefault((ram, verify), []).append(json.loads(out))
    print(f"| pack | checksums | prompt tok/s | decode tok/s | load s | decode MiB read/token | runs |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for ram in rams:
        for verify in (True, False):
            rs = res[(ram, verify)]
            med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
            spread = lambda k: (min(r[k] for r in rs), max(r[k] for r in rs))  # noqa: E731
            lo, hi = spread("decode_tok_s")
            kind = "streamed" if ram == "70M" else "pinned"
            print(f"| {kind} `--ram {ram}` | {'checked (default)' if verify else '--no-verify-checksums'} | "
                  f"{med('prompt_tok_s'):.0f} | {med('decode_tok_s'):.0f} ({lo:.0f}-{hi:.0f}) | {med('load_s'):.3f} | "
                  f"{med('decode_bytes_read_per_token') / 2**20:.2f} | {len(rs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
