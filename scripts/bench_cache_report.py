#!/usr/bin/env python3
"""Print the markdown table of a scripts/bench_cache.sh results directory.

Usage: bench_cache_report.py RESULTS_DIR

One line per (runtime, setting): the decode run and the long-prompt run of that
setting are merged. Cells of runs that are missing or failed say so ("failed",
"oom") instead of showing a number, so a partial run still reports honestly.

Column meanings (the table's footnote repeats them):
  read/token   mfx: expert bytes read during decode / decoded tokens (its own
               counter, exact). llama.cpp: bytes the kernel fetched from storage
               for the whole decode run (load + warmup + tokens, from getrusage
               ru_inblock) / (tokens + 1 warmup token): an upper bound on its
               per-token reads.
  peak RSS     the larger of the two runs' own peak RSS (/usr/bin/time -v);
               mmap'd file pages count, as they do for the cgroup.
  cgroup peak  the larger of the two runs' memory-cgroup peaks (page cache included).
  major faults of the decode run (the command's own).
  load         1-minute load average before the decode run / before the prompt run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MiB = 1 << 20


def load_json(p: Path):
    try:
        text = p.read_text().strip()
    except OSError:
        return None
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # mfx prints one JSON object; keep the last line that parses.
        for line in reversed(text.splitlines()):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def meta(res: Path) -> dict:
    out: dict = {"budgets": {}}
    for line in (res / "meta.txt").read_text().splitlines() if (res / "meta.txt").exists() else []:
        k, _, v = line.partition(" ")
        if k == "budget":
            pct, lim = v.split()
            out["budgets"][int(pct)] = int(lim)
        elif k == "budget_mfx_ram":
            pct, b = v.split()
            out.setdefault("budget_mfx_ram", {})[int(pct)] = int(b)
        elif k == "budget_pack":
            pct, name = v.split(None, 1)
            out.setdefault("budget_packs", {})[int(pct)] = name
        else:
            out[k] = v
    return out


def loads(res: Path) -> dict[str, str]:
    out = {}
    p = res / "load.log"
    for line in p.read_text().splitlines() if p.exists() else []:
        parts = line.split(None, 2)
        if len(parts) == 3:
            out[parts[0]] = parts[2].split(",")[0].strip()
    return out


def status(res: Path, tag: str) -> str | None:
    """None when the run succeeded, else a short reason."""
    mem = load_json(res / f"{tag}.mem.json")
    if mem and mem.get("oom_kills"):
        return "oom"
    if not (res / f"{tag}.json").exists():
        return "not run"
    if load_json(res / f"{tag}.json") is None:
        return "failed"
    return None


def llama_ts(res: Path, tag: str, key: str) -> tuple[float, float] | str:
    why = status(res, tag)
    if why:
        return why
    for r in load_json(res / f"{tag}.json") or []:
        if (key == "tg" and r.get("n_gen")) or (key == "pp" and r.get("n_prompt")):
            return (float(r["avg_ts"]), float(r["stddev_ts"]))
    return "failed"


def num(v: float) -> str:
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def ts_cell(v) -> str:
    if isinstance(v, str):
        return v
    avg, sd = v
    return num(avg) + (f" ± {num(sd)}" if sd > 0 else "")


def mib(b) -> str:
    return "-" if b is None else f"{b / MiB:.0f}"


def row(res: Path, who: str, setting: str, tg: str, pp: str, limit: int | None, ld: dict) -> str:
    mt, mp = load_json(res / f"{tg}.mem.json") or {}, load_json(res / f"{pp}.mem.json") or {}
    hit = read = "-"
    if who == "llama.cpp":
        dec, pre = llama_ts(res, tg, "tg"), llama_ts(res, pp, "pp")
        j = load_json(res / f"{tg}.json") if not status(res, tg) else None
        n_gen = next((r["n_gen"] for r in j or [] if r.get("n_gen")), 0)
        if n_gen and mt.get("fs_input_bytes") is not None:
            read = f"≤ {mt['fs_input_bytes'] / (n_gen + 1) / MiB:.2f}"
    else:
        jt = load_json(res / f"{tg}.json") if not status(res, tg) else None
        jp = load_json(res / f"{pp}.json") if not status(res, pp) else None
        dec = (jt["decode_tok_s"], 0.0) if jt else status(res, tg)
        pre = (jp["prompt_tok_s"], 0.0) if jp else status(res, pp)
        if jt:
            hit = f"{jt.get('decode_hit_rate', jt.get('hit_rate', 0)) * 100:.1f}%"
            read = f"{jt.get('decode_bytes_read_per_token', 0) / MiB:.2f}"
    rss = max([m.get("peak_rss_bytes") or 0 for m in (mt, mp)]) or None
    cg = max([m.get("cgroup_peak_bytes") or 0 for m in (mt, mp)]) or None
    maj = mt.get("major_faults")
    over = ""
    if limit and rss and rss > limit * 1.10:
        over = " (> +10%)"
    cells = [who, setting, "-" if limit is None else mib(limit), ts_cell(dec), ts_cell(pre), hit, read,
             mib(rss) + over, mib(cg), "-" if maj is None else str(maj), f"{ld.get(tg, '?')} / {ld.get(pp, '?')}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: bench_cache_report.py RESULTS_DIR")
    res = Path(sys.argv[1])
    m = meta(res)
    ld = loads(res)
    # meta "threads 2 tg 128 pp 2048 llama_tg_limited 128 nice -10"
    f = m.get("threads", "").split()
    kv = dict(zip(f[1::2], f[2::2]))
    tg, pp = kv.get("tg", "128"), kv.get("pp", "2048")
    pack_mib = f"{int(m['pack'].split()[-1]) / MiB:.0f} MiB" if "pack" in m else "?"
    print(f"Results: `{res}`; {m.get('mfx_version', 'mfx ?')}, commit {m.get('mfx_commit', '?')} "
          f"(binary built {m.get('mfx_binary_mtime', '?')}); started {m.get('date', '?')}; pack {pack_mib}; "
          f"{m.get('llama_cpp', '')}")
    if m.get("disk_mibps", "none") != "none":
        print()
        print(f"Limited rows read from a disk capped at {m['disk_mibps']} MiB/s (blkio throttle).")
    print()
    print(f"| runtime | setting | limit MiB | decode tok/s (tg{tg}) | prompt tok/s (pp{pp}) | mfx decode hit rate "
          "| read MiB/token | peak RSS MiB | cgroup peak MiB | major faults | load (tg / pp) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    lines = []
    if (res / "llama-resident-repack-tg.json").exists():
        lines.append(row(res, "llama.cpp", "resident, `-lm none --repack 1`", "llama-resident-repack-tg",
                         "llama-resident-repack-pp", None, ld))
        lines.append(row(res, "llama.cpp", "resident, `-lm mmap --repack 0`", "llama-resident-mmap-tg",
                         "llama-resident-mmap-pp", None, ld))
    if (res / "mfx-resident-tg.json").exists():
        lines.append(row(res, "mfx", f"resident (`--ram {m.get('resident_ram', '?')}`, no cgroup)", "mfx-resident-tg", "mfx-resident-pp", None, ld))
    for pct, lim in sorted(m["budgets"].items()):
        if (res / f"llama-b{pct}-tg.json").exists():
            lines.append(row(res, "llama.cpp", f"cgroup {pct}%, mmap", f"llama-b{pct}-tg", f"llama-b{pct}-pp", lim, ld))
        pk = m.get("budget_packs", {}).get(pct)
        mram = m.get("budget_mfx_ram", {}).get(pct, lim)
        lines.append(row(res, "mfx", f"cgroup {pct}%, `--ram {mram >> 20}M`" + (f", {pk}" if pk else ""),
                         f"mfx-b{pct}-tg", f"mfx-b{pct}-pp", lim, ld))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
