#!/usr/bin/env python3
"""Judges one agent client's run for scripts/agents_e2e.sh.

    agents_e2e_report.py CLIENT OUTDIR EXIT_CODE [--token T] [--last FILE]
                         [--file PATH --content TEXT]

Reads OUTDIR/CLIENT.jsonl (agent_proxy.py's recording), the client's output
and its exit code; prints the HTTP statuses seen, the SSE checks, whether the
model made a tool call and whether its result came back in a later request,
the final answer and a verdict (PASS / PROTOCOL / FAIL, see agents_e2e.sh).
Exits 1 on FAIL.
"""
import argparse
import collections
import json
import os
import sys


def sse_events(text):
    """(event name, data dict) pairs of an SSE body."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if not data:
            continue
        raw = "\n".join(data)
        if raw == "[DONE]":
            out.append(("[DONE]", None))
            continue
        try:
            d = json.loads(raw)
        except ValueError:
            out.append((name, {"_unparsed": raw}))
            continue
        out.append((name or d.get("type") or d.get("object"), d))
    return out


def check_anthropic(events):
    """Problems in a Messages stream's event order; the tool_use ids."""
    problems, tools, open_blocks = [], [], set()
    names = [n for n, _ in events]
    if not names or names[0] != "message_start":
        problems.append("first event is not message_start")
    if not names or names[-1] != "message_stop":
        problems.append("last event is not message_stop")
    if "message_delta" not in names:
        problems.append("no message_delta")
    for n, d in events:
        if d is None or "_unparsed" in d:
            problems.append(f"unparsable data in {n}")
            continue
        if d.get("type") != n:
            problems.append(f"event {n} carries type {d.get('type')}")
        if n == "content_block_start":
            open_blocks.add(d["index"])
            if d["content_block"].get("type") == "tool_use":
                tools.append((d["content_block"]["id"], d["content_block"]["name"]))
        elif n == "content_block_delta" and d["index"] not in open_blocks:
            problems.append(f"delta for block {d['index']} that is not open")
        elif n == "content_block_stop":
            open_blocks.discard(d["index"])
    if open_blocks:
        problems.append(f"blocks never stopped: {sorted(open_blocks)}")
    return problems, tools


def check_responses(events):
    problems, tools = [], []
    names = [n for n, _ in events]
    if not names or names[0] != "response.created":
        problems.append("first event is not response.created")
    if not names or names[-1] not in ("response.completed", "response.incomplete", "response.failed"):
        problems.append(f"last event is {names[-1] if names else None}")
    seqs = [d.get("sequence_number") for _, d in events if d]
    if seqs != sorted(seqs) or len(set(seqs)) != len(seqs):
        problems.append("sequence_number not increasing")
    for n, d in events:
        if n == "response.output_item.done" and d["item"].get("type") == "function_call":
            tools.append((d["item"]["call_id"], d["item"]["name"]))
    return problems, tools


def check_chat(events):
    problems, tools = [], []
    if not events or events[-1][0] != "[DONE]":
        problems.append("stream does not end with [DONE]")
    for _, d in events:
        for ch in (d or {}).get("choices", []):
            for tc in (ch.get("delta") or {}).get("tool_calls") or []:
                if tc.get("id"):
                    tools.append((tc["id"], (tc.get("function") or {}).get("name")))
    return problems, tools


def fed_back(entries, ids):
    """The tool-call ids whose results came back in a later request."""
    got = set()
    for e in entries:
        body = json.dumps(e.get("request_body"))
        for i in ids:
            if f'"tool_use_id": "{i}"' in body or f'"call_id": "{i}"' in body \
                    or f'"tool_call_id": "{i}"' in body:
                # The call itself also carries its id (Responses' function_call
                # item): only a result item counts.
                if ('"tool_result"' in body or '"function_call_output"' in body
                        or '"role": "tool"' in body):
                    got.add(i)
    return got


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("client", help="claude, codex or aider, optionally NAME-inject")
    ap.add_argument("outdir")
    ap.add_argument("rc", type=int)
    ap.add_argument("--token")
    ap.add_argument("--last")
    ap.add_argument("--file")
    ap.add_argument("--content")
    a = ap.parse_args()
    kind = a.client.split("-")[0]
    path = os.path.join(a.outdir, a.client + ".jsonl")
    entries = [json.loads(l) for l in open(path)] if os.path.exists(path) else []

    statuses = collections.Counter(
        f"{e['method']} {e['path'].split('?')[0]} {e.get('status', 'no answer')}" for e in entries)
    errors, stream_problems, tools = [], [], []
    for k, e in enumerate(entries):
        st = e.get("status", 0)
        if not 200 <= st < 300:
            errors.append(f"#{k} {e['method']} {e['path']} -> {st}: {str(e.get('response_body'))[:300]}")
        body = e.get("response_body")
        ctype = (e.get("response_headers") or {}).get("content-type", "")
        if isinstance(body, str) and "event-stream" in ctype:
            ev = sse_events(body)
            p = e["path"].split("?")[0]
            check = {"/v1/messages": check_anthropic, "/v1/responses": check_responses}.get(p, check_chat)
            probs, t = check(ev)
            stream_problems += [f"#{k} {p}: {x}" for x in probs]
            tools += t
        elif isinstance(body, dict):
            for c in body.get("content") or []:
                if c.get("type") == "tool_use":
                    tools.append((c["id"], c["name"]))
            for o in body.get("output") or []:
                if o.get("type") == "function_call":
                    tools.append((o["call_id"], o["name"]))
            for ch in body.get("choices") or []:
                for tc in (ch.get("message") or {}).get("tool_calls") or []:
                    tools.append((tc["id"], tc["function"]["name"]))
    back = fed_back(entries, [i for i, _ in tools])
    injected = any(e.get("injected") for e in entries)
    forced = any(e.get("forced") for e in entries)

    out = open(os.path.join(a.outdir, a.client + ".out"), errors="replace").read()
    err_path = os.path.join(a.outdir, a.client + ".err")
    err = open(err_path, errors="replace").read() if os.path.exists(err_path) else ""
    answer = None
    if kind == "claude":
        try:
            res = json.loads(out.strip().splitlines()[-1])
            answer = res.get("result")
            if res.get("is_error"):
                errors.append(f"claude reports an error: {res.get('subtype')} {answer}")
        except (ValueError, IndexError):
            errors.append("claude printed no JSON result")
    elif kind == "codex" and a.last and os.path.exists(a.last):
        answer = open(a.last, errors="replace").read()
    else:
        # Aider: what it printed after its banner, up to its token count.
        body = out.split("Added hello.txt to the chat.")[-1]
        answer = body.split("\nTokens:")[0][-600:]
    answer = (answer or "").strip()

    effect = None
    if a.token:
        effect = a.token in answer
    if a.file:
        effect = os.path.exists(a.file) and open(a.file, errors="replace").read().strip() == a.content
    if a.rc != 0:
        errors.append(f"client exited {a.rc}; stderr tail: {err[-400:]!r}")
    gens = [e for e in entries if e["method"] == "POST"]
    if not gens:
        errors.append("the client sent no request")

    print(f"== {a.client}: exit {a.rc}")
    print("  HTTP: " + "; ".join(f"{k} x{n}" for k, n in sorted(statuses.items())))
    print(f"  tool calls: {len(tools)} {[n for _, n in tools][:8]}{' (injected by the proxy)' if injected else ' (tool_choice forced by the proxy)' if forced else ''};"
          f" results fed back: {len(back)}")
    for p in stream_problems[:10]:
        print(f"  STREAM: {p}")
    for x in errors[:10]:
        print(f"  ERROR: {x}")
    print(f"  answer: {answer[:300]!r}")
    print(f"  task effect: {'yes' if effect else 'no'}")
    if errors or stream_problems:
        verdict = "FAIL"
    elif injected and back:
        # The call was the harness's, the result went to mfx and was answered.
        verdict = "ROUNDTRIP (injected call)"
    elif forced and back:
        # mfx wrote the call because tool_choice (set by the harness) said so.
        verdict = "ROUNDTRIP (forced call)" + (" + task done" if effect else "")
    elif effect and (back or kind == "aider"):
        verdict = "PASS"
    else:
        verdict = "PROTOCOL"
    print(f"  verdict: {verdict}")
    return 1 if verdict == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
