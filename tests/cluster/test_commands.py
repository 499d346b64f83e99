"""The commands as a user runs them: `ferry serve MODEL --replicas 2` (its own Ray, stopped on
SIGTERM with every Ray process it started), `ferry cluster deploy|status|shutdown` against a Ray
instance, and one-line errors (exit 2) for a bad cluster YAML."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from cluster.ray_cluster import Deployed, wait_for
from ferry_server import free_port

from ferry.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("RAY_ADDRESS", None)
# NOTE: Ray 2.60 turns token auth on for a local instance (token in ~/.ray/auth_token); a process
# that joins it by address must ask for token mode itself
JOIN_ENV = {**ENV, "RAY_AUTH_MODE": "token"}


def ferry(*argv: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ferry.cli", *argv], env=JOIN_ENV, text=True,
                          capture_output=True, timeout=timeout, check=False)


@pytest.mark.parametrize("text,message", [
    ("models: [name: x\n", "while parsing"),
    ("models:\n  - name: a\n    replica: 2\n", "model a: unknown key(s) replica"),
    ("hosts: x\nmodels:\n  - name: a\n", "cluster: unknown key(s) hosts"),
    ("models:\n  - name: a\n    autoscaling: {min_replicas: 1, maxreplicas: 2}\n",
     "model a autoscaling: unknown key(s) maxreplicas"),
    ("models:\n  - name: a\n    args: [--max-num-seqs, lots]\n", "bad ferry serve flags"),
    ("models: []\n", "`models` must be a non-empty list"),
    ("models:\n  - name: a\n    replicas: two\n", "model a: invalid literal"),
    ("models:\n  - name: a\n    resources: 2\n", "model a resources: expected a mapping"),
])
def test_bad_yaml_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         text: str, message: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    assert main(["cluster", "deploy", str(path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ferry cluster:")]
    assert len(err) == 1 and message in err[0], err


@pytest.mark.slow
def test_cluster_deploy_status_shutdown(tmp_path: Path, http_port: int, ray_address: str) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text("models:\n  - name: ferry-cmd\n    route_prefix: /cmd\n"
                      "    args: [smollm2-135m-instruct, --max-num-seqs, '2']\n    replicas: 1\n"
                      "    resources: {num_cpus: 1}\n")
    r = ferry("cluster", "deploy", str(config), "--ray-address", ray_address)
    assert r.returncode == 0, r.stderr[-2000:]
    app = Deployed("ferry-cmd", f"http://127.0.0.1:{http_port}/cmd")
    wait_for(lambda: len(app.healthy()) == 1, 60, "the deployed replica")
    got = httpx.post(app.base_url + "/v1/completions", timeout=60,
                     json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert got.status_code == 200, got.text

    r = ferry("cluster", "status", "--ray-address", ray_address)
    assert r.returncode == 0, r.stderr[-2000:]
    st = json.loads(r.stdout)["applications"]["ferry-cmd"]
    assert st["status"].endswith("RUNNING")
    states = st["deployments"]["FerryReplica"]["replicas"]
    assert sum(n for k, n in states.items() if k.endswith("RUNNING")) == 1, states
    (replica,) = st["replicas"]
    assert replica["healthy"] and replica["pid"] > 0 and "load" in replica

    r = ferry("cluster", "shutdown", "--app", "ferry-cmd", "--ray-address", ray_address)
    assert r.returncode == 0, r.stderr[-2000:]
    wait_for(lambda: httpx.get(app.base_url + "/health", timeout=5).status_code == 404, 30,
             "the application's route to go")


@pytest.mark.slow
def test_serve_replicas_starts_and_stops_its_own_ray(tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "ferry.cli", "serve", "smollm2-135m-instruct",
                             "--replicas", "2", "--max-num-seqs", "2", "--host", "127.0.0.1",
                             "--port", str(port)], env=ENV, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            r = httpx.get(base + "/health/replicas", timeout=5)
            return r.status_code == 200 and r.json()["healthy"] == 2

        wait_for(ready, 240, "ferry serve --replicas 2")
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        resp = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0,
                                              max_tokens=4,
                                              messages=[{"role": "user", "content": "Hi"}])
        assert resp.choices[0].message.content
        ray_procs = psutil.Process(proc.pid).children(recursive=True)
        names = {p.name() for p in ray_procs}
        assert any("raylet" in n for n in names) and any("gcs_server" in n for n in names), names
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert proc.wait(60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        stopped_in = time.monotonic() - t0
        gone, alive = psutil.wait_procs(ray_procs, timeout=30)
        assert not alive, f"Ray processes left behind: {[(p.pid, p.name()) for p in alive]}"
        print(f"\nferry serve --replicas 2 stopped in {stopped_in:.1f}s, {len(gone)} Ray "
              f"processes with it")
        with pytest.raises(httpx.TransportError):
            httpx.get(base + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()
