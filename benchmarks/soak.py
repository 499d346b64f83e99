"""The soak test: 32 clients through `ferry gateway` to an on-prem `ferry serve` and a recording cloud,
with disconnects, malformed bodies, over-long prompts, restricted and PII traffic, and one backend
killed and restarted midway. It checks what must hold after all of that, and exits 1 when it does not
(soak_checks.py; docs/reliability.md says what each check means):

- no 5xx (nor in-band stream error, nor broken stream, nor hung request) that is ferry's fault: any
  500, any other outside the outage the kill causes, and no traceback in the services' logs;
- no restricted or PII request reached the cloud (counted by the cloud itself, and in the ledger);
- the on-prem backend is idle once the load stops: KV cache usage, running and waiting back to 0,
  and the gateway holds no backend slot;
- the ledger has one row per request that reached the gateway, none left pending, and no served
  request recorded as abandoned (499);
- no malformed or over-long request was served (each must get a 4xx).

    .venv/bin/python benchmarks/soak.py --duration 60 --out soak.json     # CI-sized
    .venv/bin/python benchmarks/soak.py --duration 600 --out soak.json    # for the record

The logs, the gateway's config and ledger, and the cloud's record stay in the printed work directory.
Pieces: soak_traffic.py (what the clients send), soak_cloud.py (the recording cloud), soak_checks.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ferry.bench.report import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_checks import (
    Check,
    Findings,
    Timeline,
    outcome_tables,
    report,
    run_checks,
    summary_lines,
    table,
)
from soak_traffic import (
    EMPLOYEE_ID_PATTERN,
    KINDS,
    PLANTED_PII,
    Keys,
    Result,
    Traffic,
    run_clients,
)

HERE = Path(__file__).resolve().parent
PUBLIC_MODEL = "chat"
CLOUD_CONTEXT_TOKENS = 8192  # the fake cloud model's context; an over-long prompt is past this and on-prem's
T = TypeVar("T")


# ---- processes ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A server subprocess, its output appended to ``<work>/<label>.log``; it can be killed and started again."""

    def __init__(self, label: str, cmd: list[str], env: dict[str, str], work: Path, health_url: str) -> None:
        self.label, self.cmd, self.env, self.health_url = label, cmd, env, health_url
        self.log_path = work / f"{label}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:  # NOTE: the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL: a crash, not a drain."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            print(f"{self.label} did not stop within {timeout_s:g}s of SIGTERM; killing it", file=sys.stderr)
            self.kill()

    async def wait_ready(self, client: httpx.AsyncClient, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"{self.label} exited with {code}; see {self.log_path}")
            try:
                if (await client.get(self.health_url, timeout=2)).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # NOTE: still starting (not listening yet, or too busy to answer); poll again
            await asyncio.sleep(0.5)
        raise RuntimeError(f"{self.label} not ready after {timeout_s:.0f}s; see {self.log_path}")


# ---- configuration -------------------------------------------------------------------------------------


def gateway_config(args: argparse.Namespace, onprem_port: int, cloud_port: int, onprem_model: str,
                   db_path: Path) -> dict[str, Any]:
    """Two backends behind one public model: the on-prem replica first, the cloud for the overflow."""
    return {
        "backends": [
            {"name": "onprem", "url": f"http://127.0.0.1:{onprem_port}/v1", "location": "onprem", "kind": "ferry",
             "max_concurrency": args.onprem_concurrency, "timeout": 60, "connect_timeout": 2,
             "input_per_mtok": 0.05, "output_per_mtok": 0.10},
            {"name": "cloud", "url": f"http://127.0.0.1:{cloud_port}/v1", "location": "cloud", "kind": "openai",
             "max_concurrency": 64, "timeout": 30, "connect_timeout": 2,
             "input_per_mtok": 0.15, "output_per_mtok": 0.60},
        ],
        "models": [{"name": PUBLIC_MODEL, "deployments": [{"backend": "onprem", "model": onprem_model},
                                                          {"backend": "cloud", "model": "cloud-model"}]}],
        # NOTE: public traffic counts on-prem as saturated at half its slots (or 2 waiting in the engine),
        # so restricted traffic, which may only go on-prem, still finds room there.
        "routing": {"policy": "onprem-first", "retries": 1, "queue_timeout": 30, "metrics_interval": 0.5,
                    "overflow": {"inflight_fraction": 0.5, "max_waiting": 2, "max_kv_cache_usage": 0.9}},
        "health": {"interval": 1, "timeout": 1, "failure_threshold": 2, "cooldown": 2},
        "data_classes": {"public": {"locations": ["onprem", "cloud"]}, "restricted": {"locations": ["onprem"]}},
        "default_data_class": "public",
        "pii": {"enabled": True, "data_class": "restricted", "patterns": {"employee_id": EMPLOYEE_ID_PATTERN}},
        "teams": {"soak": {"budget_usd": 1000}},
        "database": f"sqlite:///{db_path}",
        "master_key_env": "FERRY_MASTER_KEY",
    }


def outage_grace_s(config: dict[str, Any]) -> float:
    """How long after a restarted backend is ready the gateway may still route around it."""
    h = config["health"]
    # NOTE: the circuit closes at the first passing health check past the cooldown; 3 s more absorb a
    # loaded machine's jitter. A request already queued when the backend came back started inside the
    # window, so it counts as the outage's whatever its queue_timeout.
    return float(h["interval"] + h["cooldown"] + 3)


async def create_keys(client: httpx.AsyncClient, gateway: str, master: str) -> Keys:
    async def key(spec: dict[str, Any]) -> str:
        resp = await client.post(gateway + "/admin/keys", json=spec, headers={"Authorization": f"Bearer {master}"})
        if resp.status_code != 201:
            raise RuntimeError(f"creating key {spec['name']}: HTTP {resp.status_code}: {resp.text[:300]}")
        return str(resp.json()["key"])

    return Keys(public=await key({"name": "soak-public", "team": "soak"}),
                restricted=await key({"name": "soak-restricted", "team": "soak", "data_class": "restricted"}),
                limited=await key({"name": "soak-limited", "team": "soak", "rpm": 20}))


# ---- reading the services' state ---------------------------------------------------------------------


def gauge_sums(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Each named gauge summed over its label sets (absent: 0)."""
    out = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        if family.name in out:
            out[family.name] += sum(s.value for s in family.samples if s.name == family.name)
    return out


async def settle(probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout_s: float) -> tuple[T, float]:
    """Poll ``probe`` until ``done`` says so or ``timeout_s`` passes; the last value and the seconds it took."""
    start = time.monotonic()
    while True:
        value = await probe()
        waited = time.monotonic() - start
        if done(value) or waited >= timeout_s:
            return value, waited
        await asyncio.sleep(0.5)


def logged_exceptions(path: Path) -> list[str]:
    """What each traceback in a log raised (its last, unindented line): errors nobody caught."""
    if not path.exists():
        return []
    raised, in_traceback = [], False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("Traceback (most recent call last):"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace() and not line.startswith(("During handling",
                                                                                           "The above exception")):
            raised.append(line.strip())
            in_traceback = False
    return raised


def read_cloud_record(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ledger_leaks_to_cloud(db_path: Path) -> int:
    """Ledger rows of restricted or PII requests served by a cloud backend (the gateway's own record)."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT count(*) FROM ferry_gateway_ledger WHERE location = 'cloud' "
                           "AND (data_class = 'restricted' OR pii = 1)").fetchone()
    return int(row[0])


# ---- the run -------------------------------------------------------------------------------------------


async def chaos(target: Proc | None, client: httpx.AsyncClient, at_s: float, t0: float, timeline: Timeline,
                load_s: float) -> None:
    """Kill ``target`` (SIGKILL) ``at_s`` into the load, start it again at once and wait until it is ready."""
    if target is None or at_s >= load_s:
        return
    await asyncio.sleep(max(0.0, t0 + at_s - time.monotonic()))
    print(f"[{time.monotonic() - t0:6.1f}s] killing {target.label}", file=sys.stderr)
    target.kill()
    timeline.killed_s = time.monotonic() - t0
    target.start()
    try:
        await target.wait_ready(client, 600)
    except RuntimeError as e:
        timeline.restart_error = str(e)
        return
    timeline.ready_s = time.monotonic() - t0
    print(f"[{timeline.ready_s:6.1f}s] {target.label} is back", file=sys.stderr)


async def soak(args: argparse.Namespace, work: Path) -> tuple[Findings, list[Check]]:
    onprem_port, cloud_port, gateway_port = free_port(), free_port(), free_port()
    master = "sk-master-" + secrets.token_urlsafe(16)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "FERRY_MASTER_KEY": master}
    planted = work / "planted.json"
    planted.write_text(json.dumps(sorted(PLANTED_PII.values())), encoding="utf-8")
    cloud = Proc("cloud", [sys.executable, str(HERE / "soak_cloud.py"), "--port", str(cloud_port),
                           "--record", str(work / "cloud.jsonl"), "--planted", str(planted),
                           "--token-ms", str(args.cloud_token_ms), "--max-context-tokens",
                           str(CLOUD_CONTEXT_TOKENS)], env, work,
                 f"http://127.0.0.1:{cloud_port}/health")
    onprem = Proc("onprem", [sys.executable, "-m", "ferry.cli", "serve", "--model", args.model, "--host", "127.0.0.1",
                             "--port", str(onprem_port), "--max-num-seqs", str(args.max_num_seqs),
                             "--max-queue", str(args.max_queue), "--kv-cache-memory", args.kv_cache_memory,
                             "--log-level", "warning"],
                  {**env, "OMP_NUM_THREADS": str(args.threads)}, work, f"http://127.0.0.1:{onprem_port}/health")
    db_path = work / "ledger.db"
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    procs = [cloud, onprem]
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout, connect=5),
                                 limits=httpx.Limits(max_connections=args.clients * 2 + 8,
                                                     max_keepalive_connections=args.clients)) as client:
        try:
            for p in procs:
                p.start()
            for p in procs:
                print(f"starting {p.label} (log: {p.log_path})", file=sys.stderr)
                await p.wait_ready(client, 600)
            models = (await client.get(f"http://127.0.0.1:{onprem_port}/v1/models")).json()["data"]
            onprem_model, context = str(models[0]["id"]), int(models[0].get("max_model_len") or 8192)
            config = gateway_config(args, onprem_port, cloud_port, onprem_model, db_path)
            (work / "gateway.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            gateway = Proc("gateway", [sys.executable, "-m", "ferry.cli", "gateway", "--config",
                                       str(work / "gateway.yaml"), "--port", str(gateway_port),
                                       "--log-level", "warning"], env, work, gateway_url + "/health")
            procs.append(gateway)
            gateway.start()
            await gateway.wait_ready(client, 120)
            keys = await create_keys(client, gateway_url, master)
            print(f"load: {args.clients} clients for {args.duration:g}s through {gateway_url}", file=sys.stderr)

            t0 = time.monotonic()
            traffic = Traffic(client, gateway_url + "/v1", PUBLIC_MODEL, keys, t0, args.max_tokens,
                              args.request_timeout, over_long_tokens=2 * max(context, CLOUD_CONTEXT_TOKENS),
                              seed=args.seed)
            timeline = Timeline(args.kill_backend, grace_s=outage_grace_s(config))
            target = {"onprem": onprem, "cloud": cloud}.get(args.kill_backend)
            killer = asyncio.create_task(chaos(target, client, args.kill_at * args.duration, t0, timeline,
                                               args.duration))
            results = await run_clients(traffic, args.clients, args.duration, KINDS, args.seed)
            load_s = time.monotonic() - t0
            print(f"[{load_s:6.1f}s] load stopped after {len(results)} requests", file=sys.stderr)
            await killer  # NOTE: bounded: a restart that never gets ready gives up after 600 s
            print(f"[{time.monotonic() - t0:6.1f}s] settling", file=sys.stderr)
            findings = await measure_idle(client, args, results, timeline, load_s, onprem_port, gateway_url,
                                          master, work, db_path)
        finally:
            for p in reversed(procs):
                p.stop()
    return findings, run_checks(findings)


async def measure_idle(client: httpx.AsyncClient, args: argparse.Namespace, results: list[Result],
                       timeline: Timeline, load_s: float, onprem_port: int, gateway_url: str, master: str,
                       work: Path, db_path: Path) -> Findings:
    """After the load: wait (bounded) for the backend, the gateway and the ledger to come to rest."""
    backend_names = ("ferry:kv_cache_usage_perc", "ferry:num_requests_running", "ferry:num_requests_waiting")

    async def backend() -> dict[str, float] | str:
        try:
            resp = await client.get(f"http://127.0.0.1:{onprem_port}/metrics", timeout=10)
            resp.raise_for_status()
        except httpx.HTTPError as e:
            return f"on-prem /metrics unreadable: {type(e).__name__}: {e}"
        return gauge_sums(resp.text, backend_names)

    async def gateway_inflight() -> float | str:
        try:
            resp = await client.get(gateway_url + "/metrics", timeout=10)
            resp.raise_for_status()
        except httpx.HTTPError as e:
            return f"gateway /metrics unreadable: {type(e).__name__}: {e}"
        return gauge_sums(resp.text, ("ferry_gateway:backend_inflight",))["ferry_gateway:backend_inflight"]

    async def usage(group_by: str) -> dict[str, int] | str:
        try:
            resp = await client.get(gateway_url + "/admin/usage", params={"group_by": group_by},
                                    headers={"Authorization": f"Bearer {master}"}, timeout=30)
            resp.raise_for_status()
        except httpx.HTTPError as e:
            return f"/admin/usage unreadable: {type(e).__name__}: {e}"
        return {str(row["group"]): int(row["requests"]) for row in resp.json()["data"]}

    # NOTE: a probe that cannot read its service returns the reason (a str), which never counts as rest
    # and makes its check fail with that reason, instead of ending the soak without a report.
    idle, backend_s = await settle(backend, lambda v: isinstance(v, dict) and not any(v.values()),
                                   args.settle_timeout)
    inflight, gateway_s = await settle(gateway_inflight, lambda v: v == 0, args.settle_timeout)
    by_status, ledger_s = await settle(lambda: usage("status"),
                                       lambda v: isinstance(v, dict) and v.get("0", 0) == 0, args.settle_timeout)
    by_location = await usage("location")
    try:
        leaks: int | str = ledger_leaks_to_cloud(db_path)
    except sqlite3.Error as e:
        leaks = f"unreadable: {e}"  # NOTE: fails its check below (not 0), with the reason in the table
    # NOTE: read before the services are stopped, so a shutdown's own noise is not counted here
    exceptions = {label: logged_exceptions(work / f"{label}.log") for label in ("gateway", "onprem")}
    return Findings(results, timeline, load_s, read_cloud_record(work / "cloud.jsonl"), by_status, by_location,
                    leaks, ledger_s, idle, backend_s, inflight, gateway_s, exceptions)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (600 for the record, 60 in CI)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--model", default="smollm2-135m-instruct", help="the on-prem ferry serve's model")
    p.add_argument("--max-num-seqs", type=int, default=4, help="on-prem batch: small, so it saturates")
    p.add_argument("--max-queue", type=int, default=8, help="on-prem admission queue")
    p.add_argument("--kv-cache-memory", default="48MiB", help="on-prem KV cache: small, so it fills")
    p.add_argument("--threads", type=int, default=1, help="OMP threads of the on-prem server")
    p.add_argument("--onprem-concurrency", type=int, default=10, help="gateway max_concurrency for on-prem")
    p.add_argument("--max-tokens", type=int, default=32, help="cap on each request's max_tokens")
    p.add_argument("--cloud-token-ms", type=float, default=30.0, help="the fake cloud's time per token")
    p.add_argument("--kill-backend", choices=("onprem", "cloud", "none"), default="onprem")
    p.add_argument("--kill-at", type=float, default=0.35, help="when to kill, as a fraction of --duration")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds before a client gives up")
    p.add_argument("--settle-timeout", type=float, default=60.0,
                   help="seconds to wait for the backend, gateway and ledger to come to rest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="soak.json")
    args = p.parse_args(argv)
    if not args.duration > 0 or args.clients < 1 or not 0 <= args.kill_at < 1:
        p.error("--duration must be > 0, --clients >= 1 and --kill-at in [0, 1)")
    if args.onprem_concurrency > args.max_num_seqs + args.max_queue:
        # NOTE: past it the replica answers 429, which a restricted request cannot fail over from (502).
        p.error("--onprem-concurrency must not exceed --max-num-seqs + --max-queue")
    return args


def main() -> int:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="ferry-soak-"))
    print(f"work directory: {work}", file=sys.stderr)
    try:
        findings, checks = asyncio.run(soak(args, work))
    except RuntimeError as e:  # a service that would not start, or a key the admin API refused
        print(f"soak could not start: {e}", file=sys.stderr)
        return 2
    print(outcome_tables(findings), "", *summary_lines(findings, args), "",
          table(["check", "value", "result", "detail"],
                [[c.name, c.value, "PASS" if c.ok else "FAIL", c.detail[:200]] for c in checks]), sep="\n")
    out = report(findings, checks, args, work)
    write_json(args.out, out)
    print(f"wrote {args.out}; logs, config, ledger and the cloud's record in {work}")
    if not out["passed"]:
        print("soak FAILED: " + ", ".join(c.name for c in checks if not c.ok), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
