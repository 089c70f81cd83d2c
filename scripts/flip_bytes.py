#!/usr/bin/env python3
"""Flip one byte at many spread offsets of a pack; count silent results.

Issue 16's "must show": for a streamed pack (`prep --ram 70M`) and a fully
pinned one (`--ram 80M`) of the bundled tiny model, flip one byte (xor 0xff)
at offsets spread over every region of the file (header, padding, dense
tensors, expert blobs by codec, manifest), then run `mfx verify`, `mfx run`
and `mfx eval ppl` on each damaged copy. A result is *silent* when the
command exits 0 and its stdout differs from the clean pack's: the user got
wrong output without a word. The goal is 0 silent; `verify` must also fail
on every flip (every byte of a pack is covered by a checksum or must-be-zero
padding).

    python3 scripts/flip_bytes.py                      # prep both packs, 300 flips each
    python3 scripts/flip_bytes.py --flips 60 --md out.md
    python3 scripts/flip_bytes.py --extra-args=--no-verify-checksums   # the old behaviour

Needs only the Python standard library and a built `target/release/mfx`.
Exit status 1 if any result was silent, a command crashed (killed by a
signal or panicked), or `verify` passed a flip.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "def fibonacci(n):"
PACKS = [("streamed", "70M"), ("pinned", "80M")]


def regions(pack: Path) -> list[tuple[int, int, str]]:
    """(start, end, kind) covering the whole file, from its header and manifest."""
    b = pack.read_bytes()
    (alignment,) = struct.unpack_from("<I", b, 24)
    data_offset, data_length, mo, ml = struct.unpack_from("<QQQQ", b, 32)
    m = json.loads(b[mo : mo + ml])
    blobs = [(t["offset"], t["offset"] + t["length"], "dense") for t in m["tensors"]]
    seen = set()
    for e in m["experts"]:
        if e["merged_into"] is not None or e["offset"] in seen:
            continue
        seen.add(e["offset"])
        blobs.append((e["offset"], e["offset"] + e["length"], f"expert:{e['codec']}"))
    blobs = sorted(x for x in blobs if x[1] > x[0])
    out = [(0, 128, "header")]
    pos = 128
    for s, e, k in blobs:
        if s > pos:
            out.append((pos, s, "padding"))
        out.append((s, e, k))
        pos = e
    if mo > pos:
        out.append((pos, mo, "padding"))
    out.append((mo, mo + ml, "manifest"))
    assert mo + ml == len(b), "regions do not cover the file"
    return out


def pick_offsets(regs, n: int, rng: random.Random) -> list[tuple[int, str]]:
    """Half the flips evenly spread over the file, half spread over the
    regions by kind (so small regions such as the header are hit too)."""
    size = regs[-1][1]
    kind_of = lambda off: next(k for s, e, k in regs if s <= off < e)  # noqa: E731
    picks = {}
    even = n // 2
    for i in range(even):
        off = min(size - 1, int((i + rng.random()) * size / even))
        picks[off] = kind_of(off)
    by_kind = defaultdict(list)
    for s, e, k in regs:
        by_kind[k].append((s, e))
    kinds = sorted(by_kind)
    for i in range(n - even):
        k = kinds[i % len(kinds)]
        s, e = rng.choice(by_kind[k])
        off = rng.randrange(s, e)
        picks[off] = k
    return sorted(picks.items())


def run(cmd: list[str], timeout: float) -> tuple[int, str, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return (-999, "", "timeout")
    return (p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))


def commands(mfx: str, pack: Path, ram: str, data: Path, extra: list[str]):
    return {
        "verify": [mfx, "verify", str(pack)],
        "run": [mfx, "run", str(pack), "-p", PROMPT, "-n", "24", "--temp", "0", "--ram", ram, *extra],
        "eval": [mfx, "eval", "ppl", str(pack), "--data", str(data), "--rows", "2", "--ctx", "64",
                 "--json", "--ram", ram, *extra],
    }


def result_of(cmd: str, out: str) -> str:
    """The part of stdout that is the model's answer: `eval --json` also
    reports cache statistics, which vary with I/O timing."""
    if cmd == "eval":
        try:
            v = json.loads(out)
            return json.dumps([v.get("nll"), v.get("ppl"), v.get("predictions")])
        except ValueError:
            return out
    return out


def classify(rc: int, out: str, err: str, clean_out: str) -> str:
    if rc == -999:
        return "timeout"
    if rc < 0 or rc == 101 or "panicked" in err:
        return "crash"
    if rc != 0:
        return "error"
    return "same" if out == clean_out else "silent"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mfx", default=str(ROOT / "target/release/mfx"))
    ap.add_argument("--model", default=str(ROOT / "models/tiny-qwen3-moe-coder-mlx-4bit"))
    ap.add_argument("--data", default=str(ROOT / "../shared/data/python.val.txt"))
    ap.add_argument("--work", help="directory for the packs (default: a temp dir); packs there are reused")
    ap.add_argument("--flips", type=int, default=300, help="flips per pack")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--extra-args", default="", help="extra flags for run and eval, e.g. --no-verify-checksums")
    ap.add_argument("--md", help="write the result table (Markdown) here")
    a = ap.parse_args()
    extra = a.extra_args.split()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="mfx-flip-"))
    work.mkdir(parents=True, exist_ok=True)
    packs = {name: work / f"tiny-{ram}.mfx" for name, ram in PACKS}
    if not all(p.exists() for p in packs.values()):
        rams = ",".join(ram for _, ram in PACKS)
        print(f"prep --ram {rams} into {work} ...", file=sys.stderr)
        subprocess.run([a.mfx, "prep", a.model, "--ram", rams, "-o", str(work / "tiny-{ram}.mfx"),
                        "--no-card", "--quiet"], check=True)
    rng = random.Random(a.seed)
    rows = []  # (pack, kind, offset, {cmd: result})
    for name, ram in PACKS:
        clean = packs[name]
        cmds = commands(a.mfx, clean, ram, Path(a.data), extra)
        base = {}
        for c, argv in cmds.items():
            rc, out, err = run(argv, a.timeout)
            if rc != 0:
                print(f"clean {name} pack: `{' '.join(argv)}` failed ({rc}):\n{err}", file=sys.stderr)
                return 2
            base[c] = result_of(c, out)
        data = clean.read_bytes()
        offs = pick_offsets(regions(clean), a.flips, rng)
        print(f"{name} pack ({len(data)} bytes): {len(offs)} flips", file=sys.stderr)

        def one(item, name=name, ram=ram, data=data, base=base):
            off, kind = item
            d = Path(tempfile.mkdtemp(dir=work))
            p = d / "flip.mfx"
            b = bytearray(data)
            b[off] ^= 0xFF
            p.write_bytes(b)
            res = {}
            for c, argv in commands(a.mfx, p, ram, Path(a.data), extra).items():
                rc, out, err = run(argv, a.timeout)
                res[c] = classify(rc, result_of(c, out), err, base[c])
                if res[c] in ("silent", "crash", "timeout"):
                    print(f"  {name} @{off} ({kind}) {c}: {res[c]} rc={rc} {err.strip()[-200:]}", file=sys.stderr)
            shutil.rmtree(d)
            return (name, kind, off, res)

        with ThreadPoolExecutor(a.jobs) as ex:
            rows.extend(ex.map(one, offs))

    # Table: per pack and region kind, how each command ended.
    lines = [
        f"| pack | region | flips | verify failed | run: error / same / silent | eval: error / same / silent |",
        "| --- | --- | ---: | ---: | --- | --- |",
    ]
    totals = Counter()
    for name, ram in PACKS:
        kinds = sorted({k for n, k, _, _ in rows if n == name})
        for k in kinds + ["all"]:
            sel = [r for n, kk, _, r in rows if n == name and (k == "all" or kk == k)]
            c = {cmd: Counter(r[cmd] for r in sel) for cmd in ("verify", "run", "eval")}

            def cell(cmd):
                x = c[cmd]
                s = f"{x['error']} / {x['same']} / {x['silent']}"
                bad = x["crash"] + x["timeout"]
                return s + (f" (+{bad} crash/timeout)" if bad else "")

            label = f"**all** ({name}, `--ram {ram}`)" if k == "all" else k
            lines.append(f"| {name} | {label} | {len(sel)} | {c['verify']['error']} | {cell('run')} | {cell('eval')} |")
            if k == "all":
                for cmd in ("run", "eval"):
                    totals["silent"] += c[cmd]["silent"]
                totals["bad"] += sum(c[cmd]["crash"] + c[cmd]["timeout"] for cmd in c)
                totals["verify_passed"] += len(sel) - c["verify"]["error"]
                totals["flips"] += len(sel)
    summary = (
        f"{totals['flips']} flips: {totals['silent']} silent run/eval results, "
        f"{totals['verify_passed']} flips passed verify, {totals['bad']} crashes/timeouts"
        + (f" (extra args: {a.extra_args})" if extra else "")
    )
    table = "\n".join(lines)
    print(table)
    print(summary)
    if a.md:
        Path(a.md).write_text(table + "\n\n" + summary + "\n")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if totals["silent"] or totals["bad"] or totals["verify_passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
