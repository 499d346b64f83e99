"""`ferry gateway` in a subprocess on a free 127.0.0.1 port, for tests that need a second process or a
gateway that dies as a crashed machine would (SIGKILL: no shutdown hook runs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from ferry_server import free_port
from gateway.conftest import ENV, MASTER


class GatewayProcess:
    """``start()`` again after ``kill()`` serves on the same port under the same instance name."""

    def __init__(self, config: dict[str, Any], workdir: Path, instance: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.instance = instance
        self.config_path = workdir / f"gateway-{instance}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"gateway-{instance}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {MASTER}"}, timeout=30)

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        cmd = [sys.executable, "-m", "ferry.cli", "gateway", "serve", "--config", str(self.config_path),
               "--host", "127.0.0.1", "--port", str(self.port), "--instance", self.instance, "--log-level", "warning"]
        env = {**os.environ, **ENV}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway {self.instance} exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway {self.instance} did not start:\n{self.log()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: rows in flight stay pending, exactly as a crash leaves them."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.admin.close()

    def create_key(self, **spec: Any) -> str:
        spec.setdefault("name", "k")
        r = self.admin.post("/admin/keys", json=spec)
        assert r.status_code == 201, r.text
        return r.json()["key"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
