"""Raw HTTP: malformed requests, auth, metrics, disconnects, the queue."""
import http.client
import json
import threading
import time

from conftest import API_KEY, Server


def request(server, method, path, body=None, headers=None, key=API_KEY):
    h = {"Content-Type": "application/json"}
    if key:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    c.request(method, path, body=data, headers=h)
    r = c.getresponse()
    raw = r.read()
    c.close()
    return r.status, raw


def test_malformed_json_and_wrong_types(server):
    cases = [
        (b"{", "malformed JSON"),
        (b"", "empty"),
        (b"[1,2]", "invalid request"),
        (json.dumps({"messages": "hi"}).encode(), "messages"),
        (json.dumps({"messages": [{"role": "user", "content": 3}]}).encode(), "messages[0].content"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), "robot"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 3}).encode(), "n = 3"),
    ]
    for body, needle in cases:
        status, raw = request(server, "POST", "/v1/chat/completions", body)
        assert status == 400, (body, status, raw)
        err = json.loads(raw)["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert needle in err["message"], (needle, err)
    status, raw = request(server, "POST", "/v1/messages", b'{"max_tokens": "many", "messages": []}')
    body = json.loads(raw)
    assert status == 400 and body["type"] == "error" and "max_tokens" in body["error"]["message"]


def test_unknown_fields_are_ignored(server):
    status, raw = request(server, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi", "extra": 1}], "max_tokens": 2,
        "logit_bias": {"1": 2}, "user": "me", "parallel_tool_calls": True, "frequency_penalty": 0})
    assert status == 200, raw
    assert json.loads(raw)["usage"]["completion_tokens"] <= 2


def test_auth_headers(server):
    assert request(server, "GET", "/v1/models", key=None)[0] == 401
    assert request(server, "GET", "/v1/models", key=None, headers={"x-api-key": API_KEY})[0] == 200
    assert request(server, "GET", "/v1/models", key="bad")[0] == 401
    assert request(server, "GET", "/health", key=None)[0] == 200
    status, raw = request(server, "GET", "/nope")
    assert status == 404 and "error" in json.loads(raw)


def test_metrics_are_prometheus_text(server):
    request(server, "POST", "/v1/completions", {"prompt": "fn main", "max_tokens": 3})
    text = server.metrics()
    for name in ["mfx_generated_tokens_total", "mfx_decode_tokens_per_second", "mfx_expert_cache_hit_rate",
                 "mfx_queue_depth", "mfx_time_to_first_token_seconds_avg"]:
        assert f"# TYPE {name} " in text, name
    assert 'mfx_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert server.metric("mfx_generated_tokens_total") >= 3


def test_client_disconnect_cancels_generation(server):
    before = server.metric("mfx_cancelled_total")
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = json.dumps({"prompt": "def main():\n", "max_tokens": 4000, "stream": True, "temperature": 1.0,
                       "ignore_eos": True})
    c.request("POST", "/v1/completions", body=body,
              headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    r = c.getresponse()
    assert r.status == 200
    r.fp.readline()  # first event arrived: generation is running
    c.sock.close()
    c.close()
    deadline = time.time() + 10
    while server.metric("mfx_cancelled_total") <= before:
        assert time.time() < deadline, "disconnect did not cancel the generation"
        time.sleep(0.05)
    # The slot is free: a new request is served at once.
    t0 = time.time()
    status, _ = request(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert status == 200 and time.time() - t0 < 5


def test_full_queue_answers_429_and_order_is_kept():
    s = Server("--max-queue", "1")
    try:
        long_prompt = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(250))
        results = {}

        def go(name, prompt):
            st, raw = request(s, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 2}, key=None)
            results[name] = (st, time.time(), raw)

        threads = []
        for i, name in enumerate(["a", "b"]):
            t = threading.Thread(target=go, args=(name, f"# {name}\n" + long_prompt))
            t.start()
            threads.append(t)
            time.sleep(0.15)
        status, raw = request(s, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}, key=None)
        for t in threads:
            t.join()
        assert status == 429, raw
        assert json.loads(raw)["error"]["type"] == "rate_limit_error"
        assert results["a"][0] == 200 and results["b"][0] == 200
        assert results["a"][1] <= results["b"][1]
        assert 'status="429"} 1' in s.metrics()
    finally:
        s.stop()
