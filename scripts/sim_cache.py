#!/usr/bin/env python3
"""Replay a routing trace through expert-cache policies, offline.

Why: routing does not depend on what the cache holds, so one trace
(`mfx bench PACK --trace-routing FILE`) replays every eviction policy and
every split of a budget between pinned experts and cache slots exactly, in
seconds, where a benchmark run per setting takes minutes and mixes in disk
noise. The runtime's policies are mirrored here (LRU, LFU with decay); OPT
(Belady: evict the expert used furthest in the future) is the bound no
policy can beat.

Usage:
  sim_cache.py TRACE --profile PROFILE.json --slots N [N ...]
               [--pin K [K ...] | --pin-scale F [F ...]] [--decode-tokens T]
               [--policy lru lfu-decay wlfu:H[:admit] opt ...] [--half-life U]

  --slots N       expert slots per MoE layer for pinned + cached together
                  (what a budget buys: (budget - dense - reserve) / expert size
                  / layers). Pinned experts take theirs first; the rest are
                  cache slots.
  --pin K         pin the first K of each layer's profile list, as a pack
                  whose budget fits K per layer does (`mfx inspect --json`
                  shows a pack's count).
  --pin-scale F   pin round(F x) the profile's pinned count per layer, by its
                  routing counts (1.0: the profile's own list): is the
                  planner's split of the budget the right one?
  --decode-tokens T  replay only the first T decode tokens (a run of `mfx
                  bench --gen-tokens T` on a longer trace).
  --policy        lru and lfu-decay mirror the runtime (half-life --half-life
                  uses); wlfu:H counts tokens per pass, decayed with a
                  half-life of H passes, and :admit adds a TinyLFU-style
                  admission test (explored, not adopted: docs/PERF.md); opt
                  is Belady's bound.

Prints the decode hit rate (and expert loads per decoded token) per setting.
The runtime's hit rate can differ slightly: a read-ahead that finished
before its `get` counts there as a hit, and prompts read each expert once
per chunk.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def load_trace(path):
    passes = []
    with open(path) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                tokens = d.get("tokens") or [1] * len(d["experts"])
                passes.append((d["phase"], d["layer"], d["experts"], tokens))
    return passes


class Lru:
    def __init__(self):
        self.clock = 0
        self.last = {}

    def touch(self, e, _t, _w=1):
        self.clock += 1
        self.last[e] = self.clock

    def victim(self, cands, _t):
        return min(cands, key=lambda e: (self.last.get(e, 0), e))

    def remove(self, e):
        self.last.pop(e, None)


class LfuDecay:
    """As runtime/src/cache/policy.rs: counts halved every `half_life` uses,
    kept across evictions; ties broken by recency."""

    def __init__(self, half_life=256):
        self.half_life = half_life
        self.uses = 0
        self.count = defaultdict(float)
        self.last = {}

    def touch(self, e, _t, _w=1):
        self.uses += 1
        if self.uses % self.half_life == 0:
            for k in self.count:
                self.count[k] *= 0.5
        self.count[e] += 1.0
        self.last[e] = self.uses

    def victim(self, cands, _t):
        return min(cands, key=lambda e: (self.count.get(e, 0.0), self.last.get(e, 0), e))

    def remove(self, e):
        pass


class WeightedLfu:
    """Counts weighted by the tokens an expert served in a pass, decayed by
    2^(-1/H) per pass (so a prompt's heavy users start ahead); evict the
    smallest count, ties by recency. With `admit`, a missed expert replaces
    the victim only if its count is at least the victim's (TinyLFU-style
    admission); else it is used once and dropped."""

    def __init__(self, half_life, admit):
        self.f = 2.0 ** (-1.0 / half_life)
        self.scale = 1.0  # counts stored as count / scale; scale grows instead of decaying all
        self.count = defaultdict(float)
        self.last = {}
        self.clock = 0
        self.admit = admit

    def tick(self):
        self.scale /= self.f

    def touch(self, e, _t, w=1):
        self.clock += 1
        self.count[e] += w * self.scale
        self.last[e] = self.clock

    def victim(self, cands, _t):
        return min(cands, key=lambda e: (self.count.get(e, 0.0), self.last.get(e, 0), e))

    def admit_over(self, new, victim):
        return not self.admit or self.count.get(new, 0.0) >= self.count.get(victim, 0.0)

    def remove(self, e):
        pass


class Opt:
    """Belady: evict the candidate next used furthest in the future."""

    def __init__(self, future):
        self.future = future  # expert -> sorted list of pass indices

    def touch(self, e, t, _w=1):
        pass

    def victim(self, cands, t):
        def nxt(e):
            for u in self.future.get(e, ()):
                if u > t:
                    return u
            return float("inf")
        return max(cands, key=lambda e: (nxt(e), e))

    def remove(self, e):
        pass


def simulate(passes, layers, pinned, cap, policy_name, half_life=256):
    """Decode hits, misses of the trace with `pinned[l]` resident and `cap[l]` slots."""
    per_layer = defaultdict(list)
    for i, (phase, layer, experts, tokens) in enumerate(passes):
        per_layer[layer].append((i, phase, experts, tokens))
    hits = misses = 0
    for layer in layers:
        seq = per_layer[layer]
        if policy_name == "opt":
            fut = defaultdict(list)
            for i, _, ex, _ in seq:
                for e in ex:
                    fut[e].append(i)
            pol = Opt(fut)
        elif policy_name == "lru":
            pol = Lru()
        elif policy_name.startswith("wlfu"):
            # wlfu:H[:admit] — token-weighted, decayed per pass with half-life H passes
            parts = policy_name.split(":")
            pol = WeightedLfu(float(parts[1]) if len(parts) > 1 else 64.0, "admit" in parts)
        else:
            pol = LfuDecay(half_life)
        pin = pinned.get(layer, set())
        c = cap[layer]
        resident = set()
        for i, phase, ex, toks in seq:
            active = set(ex)
            if hasattr(pol, "tick"):
                pol.tick()
            for e, w in zip(ex, toks):
                if e in pin:
                    if phase == "decode":
                        hits += 1
                    continue
                if e in resident:
                    pol.touch(e, i, w)
                    if phase == "decode":
                        hits += 1
                    continue
                if phase == "decode":
                    misses += 1
                pol.touch(e, i, w)
                if c == 0:
                    continue
                if len(resident) >= c:
                    cands = [r for r in resident if r not in active] or list(resident)
                    v = pol.victim(cands, i)
                    if hasattr(pol, "admit_over") and not pol.admit_over(e, v):
                        continue
                    resident.discard(v)
                    pol.remove(v)
                resident.add(e)
    return hits, misses


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--profile", required=True, help="the pack's routing/pin profile (mfx prep --save-profile)")
    ap.add_argument("--slots", type=int, nargs="+", required=True)
    ap.add_argument("--policy", nargs="+", default=["lru", "lfu-decay", "opt"])
    ap.add_argument("--pin-scale", type=float, nargs="+", default=[1.0])
    ap.add_argument("--pin", type=int, nargs="+", help="pin the first N of each layer's profile list instead (a pack's pin profile keeps what its budget fits)")
    ap.add_argument("--half-life", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, help="replay only the first N decode tokens")
    a = ap.parse_args()
    passes = load_trace(a.trace)
    if a.decode_tokens is not None:
        first = min(p[1] for p in passes)
        kept, seen = [], 0
        for p in passes:
            if p[0] == "decode" and p[1] == first:
                seen += 1
            if p[0] == "decode" and seen > a.decode_tokens:
                break
            kept.append(p)
        passes = kept
    if not passes:
        sys.exit(f"{a.trace}: no passes")
    prof = json.load(open(a.profile))
    layers = sorted({p[1] for p in passes})
    decode_tokens = sum(1 for p in passes if p[0] == "decode" and p[1] == layers[0])
    print(f"{a.trace}: {len(passes)} passes, {len(layers)} MoE layers, {decode_tokens} decode tokens")
    by_layer = {lp["layer"]: lp for lp in prof["layers"]}
    print("slots pin_scale pinned/layer policy decode_hit loads/token")
    for slots in a.slots:
        for scale in (a.pin if a.pin else a.pin_scale):
            pinned, cap = {}, {}
            for l in layers:
                lp = by_layer[l]
                if a.pin:
                    pinned[l] = set(lp["pinned"][: min(slots, scale)])
                else:
                    n = min(slots, round(len(lp["pinned"]) * scale))
                    order = sorted(range(len(lp["counts"])), key=lambda e: (-lp["counts"][e], e))
                    pinned[l] = set(lp["pinned"]) if scale == 1.0 else set(order[:n])
                cap[l] = max(0, slots - len(pinned[l]))
            mean_pin = sum(len(p) for p in pinned.values()) / len(layers)
            for pol in a.policy:
                h, m = simulate(passes, layers, pinned, cap, pol, a.half_life)
                print(f"{slots} {scale:.2f} {mean_pin:.1f} {pol} {h / max(1, h + m):.4f} {m / max(1, decode_tokens):.2f}")


if __name__ == "__main__":
    main()
