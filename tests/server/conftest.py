"""Starts real `mfx serve` processes for the tests and stops them after.

MFX_BIN and MFX_MODEL come from run.sh. Servers bind 127.0.0.1 on a port the
OS picked free; a server that does not answer /health within 60 s fails the
session loudly with its stderr.
"""
import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("MFX_BIN", os.path.join(ROOT, "target", "release", "mfx"))
MODEL = os.environ.get("MFX_MODEL", os.path.join(ROOT, "..", "shared", "models", "tiny-qwen3-moe-coder"))
REFERENCE = os.path.join(MODEL, "reference", "reference.json")
TEMPLATES = os.path.join(ROOT, "tests", "data", "templates")
API_KEY = "test-key-123"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(ROOT, "target", f"serve-test-{self.port}.log"), "w+")
        self.proc = subprocess.Popen(
            [BIN, "serve", MODEL, "--port", str(self.port), *extra],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mfx serve exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"mfx serve did not become healthy in 60 s:\n{self.stderr()}")
            time.sleep(0.1)

    def stderr(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def metrics(self, key=API_KEY):
        req = urllib.request.Request(self.url + "/metrics", headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read().decode()

    def metric(self, name, key=API_KEY):
        for line in self.metrics(key).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def server():
    """The model with its own template, behind an API key."""
    s = Server("--api-key", API_KEY)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def coder_server():
    """The model rendered with the real Qwen3-Coder tool-calling template."""
    s = Server("--chat-template", os.path.join(TEMPLATES, "qwen3-coder.jinja"), "--model-id", "tiny-coder-tools")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def reference():
    with open(REFERENCE) as f:
        return json.load(f)["prompts"]
