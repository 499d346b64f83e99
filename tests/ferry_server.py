"""The real `ferry serve` in a subprocess on a free 127.0.0.1 port, shared by every test folder."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ferry.server.metrics import parse_prometheus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`ferry serve` on a free port. ``start()`` again after ``kill()`` reuses the same port, so a
    crashed replica can come back where its clients expect it."""

    def __init__(self, model: str | Path, log_path: Path, *extra: str,
                 env: dict[str, str] | None = None, start: bool = True) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._cmd = [sys.executable, "-m", "ferry.cli", "serve", "--model", str(model),
                     "--host", "127.0.0.1", "--port", str(self.port), *extra]
        self._env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                     "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    def start(self) -> ServerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=self._env)
        return self

    def kill(self) -> None:
        """SIGKILL: the server dies as a crashed machine would, with no draining."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def metric(self, name: str) -> float:
        """One metric summed over its label sets."""
        return sum(v for k, v in self.metrics().items() if k == name or k.startswith(name + "{"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 240.0) -> ServerProcess:
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.2)
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log()[-4000:]}")

    def metrics(self) -> dict[str, float]:
        r = httpx.get(self.base_url + "/metrics", timeout=10)
        r.raise_for_status()
        return parse_prometheus(r.text)

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Poll /metrics until nothing runs and no KV block is held; returns the last scrape."""
        deadline = time.monotonic() + timeout
        m: dict[str, float] = {}
        while time.monotonic() < deadline:
            m = self.metrics()
            running = sum(v for k, v in m.items() if k.startswith("ferry:num_requests_running"))
            waiting = sum(v for k, v in m.items() if k.startswith("ferry:num_requests_waiting"))
            usage = sum(v for k, v in m.items() if k.startswith("ferry:kv_cache_usage_perc"))
            if running == 0 and waiting == 0 and usage == 0:
                return m
            time.sleep(0.1)
        raise AssertionError(f"server not idle after {timeout}s: {m}")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def __enter__(self) -> ServerProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
