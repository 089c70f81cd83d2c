#!/usr/bin/env python3
"""Bounded load test of `mfx serve` on loopback.

Starts `mfx serve MODEL` on a free 127.0.0.1 port (or uses --url, which must
be a loopback address), then for each concurrency level N runs N streaming
chat clients at once, each asking for --max-tokens tokens. Every stream is
checked for well-formedness (each `data:` line JSON, one role chunk, exactly
one finish_reason, a usage chunk, `[DONE]` last). The server's RSS is
sampled every 100 ms throughout. Prints per level: time to first token
(min/median/max), aggregate tok/s (all completion tokens / wall time), and
the RSS range; then a prefix-reuse measurement: time to first token of a
~2K-token conversation prefilled cold versus with its history cached.

Only the standard library; the request count and run time are bounded.
Exits 1 if any stream is malformed or RSS grows by more than --rss-slack-mib
between the first and the last level.
"""
import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlparse

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def one_stream(host, port, body, t_start):
    """One HTTP/1.0 streaming request; returns (ttft, completion_tokens, problems)."""
    reader, writer = await asyncio.open_connection(host, port)
    data = json.dumps(body).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode() + data
    )
    await writer.drain()
    problems = []
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split()[1])
    if status != 200:
        rest = await reader.read()
        writer.close()
        return None, 0, [f"status {status}: {rest[:200]!r}"]
    ttft = None
    events = []
    buf = b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            line = ev.decode()
            if not line.startswith("data: "):
                problems.append(f"not a data line: {line[:80]!r}")
                continue
            payload = line[6:]
            if payload == "[DONE]":
                events.append("[DONE]")
                continue
            try:
                obj = json.loads(payload)
            except ValueError:
                problems.append(f"bad JSON: {payload[:80]!r}")
                continue
            if ttft is None and obj.get("choices") and obj["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t_start
            events.append(obj)
    writer.close()
    if buf.strip():
        problems.append(f"trailing bytes: {buf[:80]!r}")
    if not events or events[-1] != "[DONE]":
        problems.append("stream does not end with [DONE]")
    objs = [e for e in events if e != "[DONE]"]
    if events.count("[DONE]") != 1:
        problems.append("[DONE] count != 1")
    if not objs or objs[0]["choices"][0]["delta"].get("role") != "assistant":
        problems.append("first chunk has no role")
    finishes = [o["choices"][0]["finish_reason"] for o in objs if o.get("choices") and o["choices"][0]["finish_reason"]]
    if len(finishes) != 1:
        problems.append(f"finish_reason chunks: {finishes}")
    usage = [o["usage"] for o in objs if o.get("usage")]
    tokens = usage[-1]["completion_tokens"] if usage else 0
    if not usage:
        problems.append("no usage chunk")
    if len({o["id"] for o in objs}) != 1:
        problems.append("chunk ids differ")
    return ttft, tokens, problems


async def level(host, port, n, max_tokens, seed_base):
    t0 = time.perf_counter()
    bodies = [
        {
            "messages": [{"role": "user", "content": f"Client {seed_base + i}: write a Python function that parses a CSV line."}],
            "max_tokens": max_tokens, "temperature": 0.7, "seed": seed_base + i, "stream": True,
            # Every client generates exactly max_tokens, so levels compare.
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        for i in range(n)
    ]
    results = await asyncio.gather(*(one_stream(host, port, b, t0) for b in bodies))
    wall = time.perf_counter() - t0
    return results, wall


def post(url, body):
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def measure_ttft(url, messages):
    """TTFT of one streaming request via a 1-token non-streaming call (the
    server-side TTFT is what we want; the client adds only loopback time)."""
    t0 = time.perf_counter()
    r = post(url, {"messages": messages, "max_tokens": 1, "temperature": 0})
    return time.perf_counter() - t0, r["usage"]


def prefix_reuse(url):
    """A ~2K-token agent history: the same conversation's next turn, first
    with a cold cache (a different conversation ran in between), then right
    after the previous turn (history cached)."""
    turns = []
    for i in range(24):
        turns.append({"role": "user", "content": f"Step {i}: refactor `parse_{i}(line)` to handle quoted fields and escapes; keep the tests green."})
        turns.append({"role": "assistant", "content": f"def parse_{i}(line):\n    out, cur, q = [], '', False\n    for ch in line:\n        if ch == '\"':\n            q = not q\n        elif ch == ',' and not q:\n            out.append(cur); cur = ''\n        else:\n            cur += ch\n    out.append(cur)\n    return out\n"})
    history = turns
    nxt = history + [{"role": "user", "content": "Now add type hints everywhere."}]
    # Warm the conversation's history, then evict it with an unrelated prompt.
    post(url, {"messages": [{"role": "user", "content": "unrelated " * 50}], "max_tokens": 1, "temperature": 0})
    cold, usage_cold = measure_ttft(url, nxt)
    # Previous turn = history without the last user message; then the next turn.
    post(url, {"messages": [{"role": "user", "content": "unrelated " * 50}], "max_tokens": 1, "temperature": 0})
    post(url, {"messages": history, "max_tokens": 1, "temperature": 0})
    warm, usage_warm = measure_ttft(url, nxt)
    return cold, warm, usage_cold, usage_warm


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "..", "shared", "models", "tiny-qwen3-moe-coder"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "mfx"))
    ap.add_argument("--levels", default="1,4,16,50,50")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rss-slack-mib", type=float, default=64.0)
    ap.add_argument("--time-limit", type=float, default=600.0, help="give up after this many seconds")
    ap.add_argument("--log", default=os.path.join(ROOT, "target", "load-test-serve.log"),
                    help="where the server's output goes")
    ap.add_argument("--json", help="also write the results to this file as JSON")
    args = ap.parse_args()
    report = {"model": args.model, "max_tokens": args.max_tokens, "levels": [],
              "rayon_num_threads": os.environ.get("RAYON_NUM_THREADS"),
              "cpus": len(os.sched_getaffinity(0))}

    port = free_port()
    host = "127.0.0.1"
    os.makedirs(os.path.dirname(os.path.abspath(args.log)), exist_ok=True)
    log = open(args.log, "w")
    proc = subprocess.Popen([args.bin, "serve", args.model, "--port", str(port), "--max-queue", "128"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{host}:{port}"
    failed = False
    samples = []
    stop = False

    def sampler():
        while not stop:
            r = rss_mib(proc.pid)
            if r is not None:
                samples.append((time.time(), r))
            time.sleep(0.1)

    import threading
    th = threading.Thread(target=sampler, daemon=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    print(f"server did not start; see {args.log}", file=sys.stderr)
                    return 1
                time.sleep(0.1)
        th.start()
        # Warm-up (page in the weights) so level 1 measures steady state.
        post(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        t_begin = time.time()
        level_rss = []
        print(f"{'clients':>7} {'ttft min/med/max (s)':>24} {'tokens':>7} {'wall s':>7} {'agg tok/s':>9} {'rss MiB':>15}")
        for i, n in enumerate(int(x) for x in args.levels.split(",")):
            if time.time() - t_begin > args.time_limit:
                print("time limit reached", file=sys.stderr)
                failed = True
                break
            s0 = len(samples)
            results, wall = asyncio.run(level(host, port, n, args.max_tokens, 1000 * (i + 1)))
            rss = [r for _, r in samples[s0:]] or [rss_mib(proc.pid)]
            level_rss.append(max(rss))
            problems = [p for _, _, ps in results for p in ps]
            ttfts = sorted(t for t, _, _ in results if t is not None)
            tokens = sum(k for _, k, _ in results)
            if problems or len(ttfts) != n:
                failed = True
                print(f"  {n} clients: {len(problems)} problems, e.g. {problems[:3]}", file=sys.stderr)
            if not ttfts:
                continue
            print(f"{n:>7} {ttfts[0]:>7.3f}/{statistics.median(ttfts):>7.3f}/{ttfts[-1]:>7.3f} {tokens:>7} "
                  f"{wall:>7.2f} {tokens / wall:>9.1f} {min(rss):>7.1f}-{max(rss):>6.1f}")
            report["levels"].append({
                "clients": n, "ttft_min_s": ttfts[0], "ttft_median_s": statistics.median(ttfts),
                "ttft_max_s": ttfts[-1], "tokens": tokens, "wall_s": wall, "agg_tok_s": tokens / wall,
                "rss_min_mib": min(rss), "rss_max_mib": max(rss), "problems": len(problems)})
        cold, warm, uc, uw = prefix_reuse(url)
        print(f"prefix reuse: {uc['prompt_tokens']}-token prompt, TTFT cold {cold:.3f} s "
              f"(cached {uc['prompt_tokens_details']['cached_tokens']}), warm {warm:.3f} s "
              f"(cached {uw['prompt_tokens_details']['cached_tokens']}); saved {cold - warm:.3f} s")
        report["prefix_reuse"] = {"prompt_tokens": uc["prompt_tokens"], "ttft_cold_s": cold, "ttft_warm_s": warm,
                                  "cached_cold": uc["prompt_tokens_details"]["cached_tokens"],
                                  "cached_warm": uw["prompt_tokens_details"]["cached_tokens"]}
        # Flat means: the last level (a repeat of the largest) peaks no
        # higher than the levels before it, give or take the slack.
        before = max(level_rss[:-1]) if len(level_rss) > 1 else level_rss[0]
        growth = level_rss[-1] - before
        print(f"server RSS: peak before last level {before:.1f} MiB, last level peak {level_rss[-1]:.1f} MiB "
              f"(growth {growth:+.1f} MiB, allowed {args.rss_slack_mib})")
        report["rss_growth_mib"] = growth
        if growth > args.rss_slack_mib:
            failed = True
    finally:
        stop = True
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    print("load test:", "FAILED" if failed else "ok")
    if args.json:
        report["failed"] = failed
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
