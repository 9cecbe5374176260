"""Helpers for the server tests: `pnl serve` as a real subprocess on 127.0.0.1 (the bundled model, a
small KV cache, a free port), Prometheus and SSE parsing."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

API_KEYS = ("sk-test-one", "sk-test-two")
MAX_BODY_BYTES = 65536
LOAD_TIMEOUT_S = 120  # model load on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `pnl serve` process; its output goes to a log file (never a pipe that could fill up)."""

    def __init__(self, log_path: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PNL_")}
        full_env.update(env or {})
        cmd = [sys.executable, "-m", "professional_nano_llm", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--kv-cache-memory-gb", "0.2", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = LOAD_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=30).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log()[-3000:]}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server still running after {timeout} s:\n{self.log()[-3000:]}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def start_server(tmp_path_factory, name: str, *args: str, env: dict[str, str] | None = None) -> Server:
    return Server(tmp_path_factory.mktemp(name) / "server.log", *args, env=env)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (labels given must all match)."""
    for line in text.splitlines():
        m = re.match(r"^([^\s{]+)(?:\{([^}]*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    raise KeyError(f"{name}{labels} not in metrics")


def sse_frames(raw: bytes) -> list[str]:
    """Splits an SSE body into frames, asserting the exact framing: `data: <payload>` + blank line."""
    text = raw.decode()
    assert text.endswith("\n\n"), text[-200:]
    frames = text[:-2].split("\n\n")
    for frame in frames:
        assert frame.startswith("data: ") and "\n" not in frame, frame
    return [f[len("data: "):] for f in frames]
