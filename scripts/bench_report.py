#!/usr/bin/env python3
"""Turn a bench_peers.sh results directory into the markdown tables of docs/PERF.md.

Usage: bench_report.py RESULTS_DIR
Missing files become "-" so a partial run still reports what it has; mfx cells
say "mfx: to be measured" until bench_peers.sh's mfx step has produced output.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

TBD = "mfx: to be measured"


def load_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def bench_rows(p: Path) -> dict[tuple[int, str], tuple[float, float]]:
    """llama-bench JSON -> {(threads, 'pp128'|'tg128'): (avg t/s, stddev)}."""
    out = {}
    for r in load_json(p) or []:
        test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        out[(r["n_threads"], test)] = (r["avg_ts"], r["stddev_ts"])
    return out


def fmt(v: tuple[float, float] | None) -> str:
    if v is None:
        return "-"
    avg, sd = v
    return f"{avg:.2f} ± {sd:.2f}" if avg < 100 else f"{avg:.0f} ± {sd:.0f}"


def mfx_tps(p: Path, which: str = "decode") -> str:
    """tok/s from mfx run's stderr summary line
    ("prompt: N tok, X tok/s | decode: N tok, Y tok/s | peak RSS Z MiB")."""
    try:
        text = p.read_text()
    except OSError:
        return TBD
    m = re.findall(which + r":\s*\d+ tok, ([0-9.]+) tok/s", text)
    if not m:
        return f"failed, see {p.name}"
    v = float(m[-1])
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def main() -> None:
    res = Path(sys.argv[1])
    out = []
    bw = load_json(res / "membw.json") or {}
    disk = load_json(res / "disk.json") or {}
    if bw or disk:
        out += ["### Machine bounds", "", "| measure | value |", "| --- | --- |"]
        for k in sorted(bw):
            out.append(f"| {k} | {bw[k]} |")
        for k in sorted(disk):
            if k not in ("file",):
                out.append(f"| disk {k} | {disk[k]} |")
        out.append("")

    out += ["### tiny-qwen3-moe-coder (24.2 M params), llama.cpp, in RAM", "",
            "| GGUF | size MiB | greedy tokens matched (of 5x48) | pp128 t1 | tg128 t1 | pp128 t2 | tg128 t2 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for q in ("bf16", "q4_0", "q4_k_m"):
        rows = bench_rows(res / f"tiny-{q}-bench.json")
        g = load_json(res / f"tiny-{q}-greedy.json") or {}
        matched = sum(v["greedy_matched"] for v in g.get("results", {}).values()) if g else None
        size = next((r["model_size"] for r in load_json(res / f"tiny-{q}-bench.json") or []), None)
        out.append(f"| {q} | {size / 2**20:.1f} | {matched if matched is not None else '-'} | "
                   f"{fmt(rows.get((1, 'pp128')))} | {fmt(rows.get((1, 'tg128')))} | "
                   f"{fmt(rows.get((2, 'pp128')))} | {fmt(rows.get((2, 'tg128')))} |" if size else f"| {q} | - | - | - | - | - | - |")
    for kind, label in (("bf16", "mfx, bf16 HF dir"), ("pack", "mfx, .mfx pack (prep --ram 1G)")):
        t1, t2 = res / f"mfx-tiny-{kind}-t1.err", res / f"mfx-tiny-{kind}-t2.err"
        g = load_json(res / f"mfx-tiny-{kind}-greedy.json") or {}
        matched = sum(v["greedy_matched"] for v in g.get("results", {}).values()) if g else TBD
        out.append(f"| {label} | | {matched} | {mfx_tps(t1, 'prompt')} | {mfx_tps(t1)} | {mfx_tps(t2, 'prompt')} | {mfx_tps(t2)} |")
    mlx = (res / "mlx-tiny.txt")
    if mlx.is_file():
        m = re.search(r"Averages: prompt_tps=([0-9.]+), generation_tps=([0-9.]+)", mlx.read_text())
        if m:
            out.append(f"| mlx-lm 4-bit (CPU) | | | {float(m[1]):.1f} | {float(m[2]):.1f} | | |")
    out.append("")

    out += ["### Qwen3-30B-A3B-shaped, 8 layers, Q4_0, llama.cpp", "",
            "| setting | threads | pp128 t/s | tg128 t/s | pp2048 t/s | cgroup peak MiB | major faults |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, label in (("syn-ram-repack", "in RAM, repacked (-lm none)"), ("syn-ram-mmap", "in RAM, mmap, no repack")):
        rows = bench_rows(res / f"{name}.json")
        pp2k = bench_rows(res / "syn-ram-pp2048.json") if name == "syn-ram-repack" else {}
        for t in (2, 1):
            out.append(f"| {label} | {t} | {fmt(rows.get((t, 'pp128')))} | {fmt(rows.get((t, 'tg128')))} | "
                       f"{fmt(pp2k.get((t, 'pp2048')))} | | |")
    for f in sorted(res.glob("syn-cg*-tg.json")):
        lim = f.name[len("syn-cg"):-len("-tg.json")]
        rows = bench_rows(f)
        pp2k = bench_rows(res / f"syn-cg{lim}-pp2048.json")
        mem = load_json(res / f"syn-cg{lim}-tg.mem.json") or {}
        peak = f"{mem['cgroup_peak_bytes'] / 2**20:.0f}" if mem else "-"
        out.append(f"| cgroup {lim}, mmap, no repack | 2 | {fmt(rows.get((2, 'pp128')))} | "
                   f"{fmt(rows.get((2, 'tg128')))} | {fmt(pp2k.get((2, 'pp2048')))} | {peak} | "
                   f"{mem.get('major_faults', '-')} |")
        mm = load_json(res / f"mfx-syn-cg{lim}-tg.mem.json") or {}
        mpeak = f"{mm['cgroup_peak_bytes'] / 2**20:.0f}" if mm else "-"
        tg = res / f"mfx-syn-cg{lim}-tg.err"
        out.append(f"| mfx, cgroup {lim} | 2 | {mfx_tps(tg, 'prompt')} | {mfx_tps(tg)} | "
                   f"{mfx_tps(res / f'mfx-syn-cg{lim}-pp2048.err', 'prompt')} | {mpeak} | {mm.get('major_faults', '-')} |")
    out.append("")
    load = res / "load.log"
    if load.is_file():
        out += ["Load average (1/5/15 min) when each run started:", "", "```", load.read_text().rstrip(), "```", ""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
