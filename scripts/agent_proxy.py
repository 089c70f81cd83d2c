#!/usr/bin/env python3
"""A logging HTTP proxy between an agent client and `mfx serve`.

    agent_proxy.py LISTEN_PORT UPSTREAM_URL LOG.jsonl

Forwards every request to UPSTREAM_URL unchanged and appends one JSON line
per exchange to LOG.jsonl: method, path, request headers and body, response
status, headers and body (a streamed body is recorded whole, after it ends,
while the client receives it chunk by chunk). Standard library only, so
scripts/agent_clients.sh needs no extra install.
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


def decode(b):
    text = b.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


if __name__ == "__main__":
    main()
