#!/usr/bin/env python3
"""A logging HTTP proxy between an agent client and `mfx serve`.

    agent_proxy.py LISTEN_PORT UPSTREAM_URL LOG.jsonl [INJECT_JSON]

Forwards every request to UPSTREAM_URL unchanged and appends one JSON line
per exchange to LOG.jsonl: method, path, request headers and body, response
status, headers and body (a streamed body is recorded whole, after it ends,
while the client receives it chunk by chunk). Standard library only, so
scripts/agents_e2e.sh needs no extra install.

INJECT_JSON, a diagnostic for a model that makes no tool calls:
`{"api": "anthropic"|"responses", "name": TOOL, "input": {...}}`. The first
streamed generation request is then not forwarded: the proxy answers it
itself with one call of TOOL in that API's stream format (recorded with
`"injected": true`), so the client runs the tool and sends its result to
mfx in its next request -- the second-turn shapes (tool_result blocks,
function_call_output items) of the real client reach the server. What the
model would have called is not tested by this, only the protocol.
With `"force": true` the request is forwarded instead, with `tool_choice`
set to TOOL: mfx itself must then write the call (with constrained
decoding, schema-valid arguments whatever the model).
"""
import http.client
import http.server
import json
import socketserver
import sys
import threading
import time
import urllib.parse

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
       "proxy-connection", "content-length", "host", "accept-encoding"}


def main():
    port, upstream, log_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    inject = [json.loads(sys.argv[4])] if len(sys.argv) > 4 and sys.argv[4] else []
    up = urllib.parse.urlsplit(upstream)
    lock = threading.Lock()

    def record(entry):
        with lock, open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def relay(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            entry = {"time": time.time(), "method": self.command, "path": self.path,
                     "request_headers": headers, "request_body": decode(body)}
            req = entry["request_body"]
            if (inject and self.command == "POST" and isinstance(req, dict) and req.get("stream")
                    and self.path.split("?")[0] in ("/v1/messages", "/v1/responses")):
                with lock:
                    spec = inject.pop() if inject else None
                if spec and spec.get("force"):
                    choice = ({"type": "tool", "name": spec["name"]} if spec["api"] == "anthropic"
                              else {"type": "function", "name": spec["name"]})
                    body = json.dumps(dict(req, tool_choice=choice)).encode()
                    entry.update(forced=spec["name"], request_body=decode(body))
                elif spec:
                    sse = injected_stream(spec, req.get("model", ""))
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Content-Length", str(len(sse)))
                    self.end_headers()
                    self.wfile.write(sse)
                    entry.update(status=200, injected=True,
                                 response_headers={"content-type": "text/event-stream"},
                                 response_body=sse.decode(), seconds=0)
                    record(entry)
                    return
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=600)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
            except OSError as e:
                entry["error"] = f"upstream: {e}"
                record(entry)
                msg = json.dumps({"error": {"message": f"proxy: upstream unreachable: {e}"}}).encode()
                self.send_response(502)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)
                return
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in HOP:
                    self.send_header(k, v)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            got = bytearray()
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    break
                got += chunk
                try:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                except OSError:
                    break
            try:
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
            entry.update(status=resp.status, response_headers=dict(resp.getheaders()),
                         response_body=decode(bytes(got)), seconds=round(time.time() - entry["time"], 3))
            record(entry)
            conn.close()

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = relay

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    Server(("127.0.0.1", port), Handler).serve_forever()


def injected_stream(spec, model):
    """One tool call of `spec` as a streamed reply of `spec["api"]`."""
    args = json.dumps(spec["input"])
    events = []
    if spec["api"] == "anthropic":
        events = [
            {"type": "message_start", "message": {
                "id": "msg_injected", "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 0}}},
            {"type": "content_block_start", "index": 0, "content_block": {
                "type": "tool_use", "id": "toolu_injected1", "name": spec["name"], "input": {}}},
            {"type": "content_block_delta", "index": 0,
             "delta": {"type": "input_json_delta", "partial_json": args}},
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
             "usage": {"output_tokens": 1}},
            {"type": "message_stop"},
        ]
        return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()
    item = {"type": "function_call", "id": "fc_injected1", "call_id": "call_injected1",
            "name": spec["name"], "arguments": args, "status": "completed"}
    resp = {"id": "resp_injected", "object": "response", "created_at": int(time.time()),
            "model": model, "status": "in_progress", "output": [], "usage": None}
    done = dict(resp, status="completed", output=[item],
                usage={"input_tokens": 1, "output_tokens": 1, "total_tokens": 2,
                       "input_tokens_details": {"cached_tokens": 0},
                       "output_tokens_details": {"reasoning_tokens": 0}})
    events = [
        {"type": "response.created", "response": resp},
        {"type": "response.output_item.added", "output_index": 0,
         "item": dict(item, arguments="", status="in_progress")},
        {"type": "response.function_call_arguments.delta", "item_id": item["id"],
         "output_index": 0, "delta": args},
        {"type": "response.function_call_arguments.done", "item_id": item["id"],
         "output_index": 0, "arguments": args},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": done},
    ]
    for n, e in enumerate(events):
        e["sequence_number"] = n
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()


def decode(b):
    text = b.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


if __name__ == "__main__":
    main()
