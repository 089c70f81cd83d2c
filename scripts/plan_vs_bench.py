#!/usr/bin/env python3
"""`mfx plan` against `mfx bench` on one pack (issue 21: within +-25%).

Runs `mfx plan PACK --json` once, then `mfx bench` at each of the plan's
budgets (teacher-forced on TEXT, decode only after a short prompt, median of
ROUNDS runs), and prints predicted vs measured decode tok/s and hit rate.

    scripts/plan_vs_bench.py PACK TEXT [--rounds 3] [--gen 256] [--mfx target/release/mfx]
"""
import argparse, json, statistics, subprocess, sys

ap = argparse.ArgumentParser()
ap.add_argument("pack")
ap.add_argument("text")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--gen", type=int, default=256)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--mfx", default="target/release/mfx")
ap.add_argument("--ram", default=None, help="passed to mfx plan --ram")
ap.add_argument("--plan-text", action="store_true", help="probe plan on TEXT too (default: its built-in text)")
a = ap.parse_args()

def run(args):
    r = subprocess.run([a.mfx] + args, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"mfx {' '.join(args)} failed: {r.stderr}")
    return json.loads(r.stdout)

plan_args = ["plan", a.pack, "--json"] + (["--ram", a.ram] if a.ram else []) + (["--text", a.text] if a.plan_text else [])
plan = run(plan_args)
print(f"pack {a.pack}: probes " + ", ".join(
    f"{p['budget_bytes'] / 2**20:.0f} MiB {p['ms_per_token']:.3f} ms/token" for p in plan["probes"]))
print(f"{'budget MiB':>10} {'plan tok/s':>10} {'bench tok/s':>11} {'ratio':>6} {'plan hit':>8} {'bench hit':>9} {'plan KiB/t':>10} {'bench KiB/t':>11}")
worst = 0.0
for row in plan["budgets"]:
    b = row["budget_bytes"]
    toks, hits, reads = [], [], []
    for _ in range(a.rounds):
        m = run(["bench", a.pack, "--ram", str(b), "--text", a.text, "--prompt-tokens", "16",
                 "--gen-tokens", str(a.gen), "--max-context", str(plan["context"]), "--threads", str(a.threads), "--json"])
        toks.append(m["decode_tok_s"]); hits.append(m["decode_hit_rate"])
        reads.append(m["decode_bytes_read_per_token"])
    t = statistics.median(toks)
    ratio = row["tok_s"] / t
    worst = max(worst, abs(ratio - 1))
    print(f"{b / 2**20:>10.1f} {row['tok_s']:>10.1f} {t:>11.1f} {ratio:>6.2f} {row['hit_rate'] * 100:>7.1f}% "
          f"{statistics.median(hits) * 100:>8.1f}% {row['read_bytes_per_token'] / 1024:>10.1f} {statistics.median(reads) / 1024:>11.1f}")
print(f"largest deviation of plan from bench: {worst * 100:.0f}%")
