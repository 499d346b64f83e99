"""`ferry serve` in a subprocess on a fixed loopback port, so a killed replica can come back on it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.upstream import bind_free_port


class FerryServe:
    def __init__(self, model: Path, name: str, log_dir: Path, *extra: str) -> None:
        sock = bind_free_port()
        self.port = sock.getsockname()[1]
        sock.close()
        self.name = name
        self.model = model
        self.extra = extra
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FerryServe:
        cmd = [sys.executable, "-m", "ferry.cli", "serve", "--model", str(self.model), "--served-model-name",
               "tiny", "--host", "127.0.0.1", "--port", str(self.port), "--max-num-seqs", "8",
               "--kv-cache-memory", "16MiB", *self.extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self, timeout: float = 120.0) -> FerryServe:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready in {timeout}s")

    def kill(self) -> None:
        """SIGKILL: the replica dies as a crashed machine would, with no draining."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def metric(self, name: str) -> float:
        """A sample summed over its label sets, from the replica's own /metrics."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name:
                    total += s.value
        return total
