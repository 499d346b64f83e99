"""`ferry plan --emit DIR`: the files that deploy what a plan recommends.

    cluster.yaml   `ferry cluster deploy` (Ray Serve): ferry serve flags, replicas or autoscaling bounds from
                   the hourly profile, CPUs / GPUs / memory per replica
    values.yaml    Helm values for deploy/helm/ferry: the model's Deployment, GPU resources, HPA bounds and
                   the gateway's backends, prices, overflow and data classes
    gateway.yaml   `ferry gateway`: the on-prem backend (the replicas' ingress), the overflow backend (rented
                   GPUs or an API) with the plan's prices, overflow thresholds, data classes
    README.md      what each file is, how to apply it, what the plan assumed

Plain YAML only: ``ferry.cluster`` and ``ferry.gateway`` sit beside or above the planner (import layers), so
the emitted files are checked by their own parsers in the tests, not here. Secrets never appear: backends
name environment variables (``api_key_env``).

A layout ``ferry serve`` cannot run gets no ferry configuration (it would not start): gateway.yaml points
at an on-prem vLLM/SGLang backend placeholder and the README gives that engine's command.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ferry.planner.catalog import GIB, ModelSpec
from ferry.planner.engines import FERRY, hf_repo
from ferry.planner.errors import PlannerError
from ferry.planner.options import API, CLOUD, ONPREM
from ferry.planner.plan import Deployment, Plan
from ferry.planner.text import plural

CLUSTER, VALUES, GATEWAY, README = "cluster.yaml", "values.yaml", "gateway.yaml", "README.md"
EMITTED = (CLUSTER, VALUES, GATEWAY, README)
SERVE_PORT = 8000
# NOTE: gpus.yaml's "cpu" is one 32-core socket per replica; a GPU replica's host side (tokenizer, scheduler,
# HTTP) needs a few cores per GPU.
CPU_SOCKET_CORES = 32
CPUS_PER_GPU = 4
# host memory beyond the weights that a GPU replica's process needs (Python, torch, CUDA context, tokenizer)
GPU_HOST_MEMORY_GIB = 4.0
_TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class EmitSettings:
    """What the emitted files need beyond the plan."""

    serve_model: str  # what `ferry serve` loads: a built-in name, a Hub repo id or a path
    replica_cpus: float | None = None  # None: CPU_SOCKET_CORES on --gpu cpu, CPUS_PER_GPU per GPU otherwise
    force: bool = False


def serve_model_ref(model_ref: str, model: ModelSpec) -> str:
    """The ``--model`` ferry serve loads for a plan's ``--model``: ferry's built-in names, Hub repo ids and
    paths as given (a config.json: its folder); catalogue names become the Hub repo of their source."""
    from ferry.hub import is_repo_id
    from ferry.loader.registry import builtin_names

    text = model_ref.strip()
    if text.lower() in builtin_names():
        return text.lower()
    path = Path(text).expanduser()
    if path.exists():
        return str((path.parent if path.is_file() and path.suffix.lower() == ".json" else path).resolve())
    if is_repo_id(text):
        return text
    return hf_repo(model)


def _name(model: str) -> str:
    """A DNS label (Kubernetes names, Serve application and gateway backend names) from a model name."""
    label = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:40].strip("-")
    return label or "model"


# ---- the replica ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Replica:
    """One ferry replica as the emitted configs describe it (traffic plan or memory-only)."""

    name: str
    served_name: str
    serve_args: tuple[str, ...]  # ferry serve flags after the model
    gpus: int
    cpus: float
    memory_bytes: int
    replicas: int
    replicas_min: int
    replicas_max: int
    batch: int  # sequences one replica runs at once (its --max-num-seqs)
    max_concurrency: int  # in-flight requests the gateway sends the whole fleet
    input_per_mtok: float
    output_per_mtok: float

    @property
    def autoscaled(self) -> bool:
        return self.replicas_min != self.replicas_max


def _replica(plan: Plan, s: EmitSettings) -> _Replica:
    i, mem, load = plan.inputs, plan.memory, plan.load
    dep = load.deployment if load else None
    batch = dep.max_concurrency_per_replica if dep else i.max_num_seqs
    args: list[str] = ["--served-model-name", i.model.name]
    if i.dtype.name in _TORCH_DTYPE:
        args += ["--dtype", _TORCH_DTYPE[i.dtype.name]]
    args += ["--max-model-len", str(i.context)]
    if i.gpu.name == "cpu":
        args += ["--device", "cpu", "--kv-cache-memory", str(int(mem.per_gpu_kv_bytes))]
    else:
        args += ["--device", "cuda"]
        if i.kv_cache_memory is not None:
            args += ["--kv-cache-memory", str(i.kv_cache_memory)]
        else:
            args += ["--gpu-memory-utilization", f"{i.memory_utilization:g}"]
    args += ["--max-num-seqs", str(batch), "--max-num-batched-tokens", str(i.max_num_batched_tokens),
             "--block-size", str(i.block_size)]
    if i.gpu.name == "cpu":
        # NOTE: on a CPU the replica's host memory holds everything the plan puts "on the device"
        need = mem.per_gpu_weight_bytes + mem.per_gpu_overhead_bytes + mem.per_gpu_activation_bytes \
            + mem.per_gpu_kv_bytes
        cpus = s.replica_cpus or CPU_SOCKET_CORES
    else:
        # NOTE: weights stream through host memory on load (safetensors are memory-mapped)
        need = mem.weight_bytes + GPU_HOST_MEMORY_GIB * GIB
        cpus = s.replica_cpus or CPUS_PER_GPU * mem.gpus
    if dep is not None:
        lo, hi = dep.replicas_min, dep.replicas_max
        fleet, price_in, price_out = hi, dep.input_per_mtok, dep.output_per_mtok
    else:
        lo = hi = fleet = 1
        price_in = price_out = 0.0
    return _Replica(name=_name(i.model.name), served_name=i.model.name, serve_args=tuple(args),
                    gpus=0 if i.gpu.name == "cpu" else mem.gpus, cpus=float(cpus),
                    memory_bytes=math.ceil(need / GIB) * GIB, replicas=max(hi, 1), replicas_min=lo,
                    replicas_max=max(hi, 1), batch=batch, max_concurrency=max(1, fleet) * batch,
                    input_per_mtok=price_in, output_per_mtok=price_out)


def _gib(n: int) -> str:
    return f"{n // GIB}GiB"


def _kube_gib(n: int) -> str:
    """A Kubernetes quantity (binary suffixes drop the B: ``2Gi``)."""
    return f"{n // GIB}Gi"


# ---- cluster.yaml -----------------------------------------------------------------------------------


def cluster_config(r: _Replica, s: EmitSettings) -> dict[str, Any]:
    model: dict[str, Any] = {"name": r.name, "args": [s.serve_model, *r.serve_args]}
    if r.autoscaled:
        # NOTE: ferry's autoscaling policy aims for target_load running + waiting sequences per replica; the
        # SLO batch is one replica's full load within the latency targets.
        model["autoscaling"] = {"min_replicas": r.replicas_min, "max_replicas": r.replicas_max,
                                "target_load": float(r.batch)}
    else:
        model["replicas"] = r.replicas
    model["resources"] = {"num_cpus": r.cpus, "num_gpus": r.gpus, "memory": _gib(r.memory_bytes)}
    return {"host": "0.0.0.0", "port": SERVE_PORT, "models": [model]}


# ---- gateway.yaml -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Backend:
    config: dict[str, Any]
    model: str  # the model name the backend serves


def _overflow_backend(plan: Plan, dep: Deployment, onprem_in: float, onprem_out: float) -> _Backend | None:
    """The backend that takes the traffic beyond the on-prem replicas (or all of it: the API option)."""
    load = plan.load
    assert load is not None
    model = plan.inputs.model
    if dep.overflow_target == API:
        price = plan.inputs.costs.api_price
        return _Backend({"name": "api", "url": "https://api.provider.example/v1", "location": "cloud",
                         "kind": "openai", "api_key_env": "API_PROVIDER_KEY", "max_concurrency": 64,
                         "timeout": 120, "input_per_mtok": round(price.input_usd_per_mtok, 4),
                         "output_per_mtok": round(price.output_usd_per_mtok, 4)}, hf_repo(model))
    if dep.overflow_target == CLOUD:
        # NOTE: rented GPUs run the same replicas; their tokens cost the cloud option's $/Mtok, split between
        # prompt and output as the on-prem price is (by replica time).
        cloud, onprem = load.option(CLOUD), load.option(ONPREM)
        scale = cloud.usd_per_mtok / onprem.usd_per_mtok if onprem.usd_per_mtok > 0 else 1.0
        rented = max(1, load.option(load.recommendation.option).peak_rented_replicas)
        return _Backend({"name": f"cloud-{_name(model.name)}", "url": f"https://{_name(model.name)}.cloud.example/v1",
                         "location": "cloud", "kind": "ferry", "api_key_env": "CLOUD_FERRY_API_KEY",
                         "max_concurrency": rented * dep.max_concurrency_per_replica, "timeout": 120,
                         "input_per_mtok": round(onprem_in * scale, 4),
                         "output_per_mtok": round(onprem_out * scale, 4)}, model.name)
    return None


def _gateway_settings(plan: Plan, has_onprem: bool) -> dict[str, Any]:
    dep = plan.load.deployment if plan.load else None
    classes = {"public": ["onprem", "cloud"], "restricted": ["onprem"]}
    if dep is not None:
        classes.update({k: list(v) for k, v in dep.data_classes.items()})
    fraction = dep.overflow_inflight_fraction if dep else 1.0
    return {
        "routing": {"policy": "onprem-first", "retries": 2, "queue_timeout": 30, "metrics_interval": 1.0,
                    "overflow": {"inflight_fraction": fraction, "max_waiting": 1, "max_kv_cache_usage": 0.95}},
        "health": {"interval": 5, "timeout": 2, "failure_threshold": 3, "cooldown": 10},
        "data_classes": {k: {"locations": v} for k, v in classes.items()},
        "default_data_class": dep.default_data_class if dep else "public",
        # NOTE: PII tightens a request to `restricted` (on-prem only): without an on-prem backend it could not
        # be served, so detection is off and the README says so.
        "pii": {"enabled": has_onprem},
        "master_key_env": "FERRY_MASTER_KEY",
    }


def gateway_config(plan: Plan, r: _Replica | None, onprem_url: str) -> dict[str, Any]:
    """The gateway YAML: ``r`` is the ferry fleet (None: the on-prem backend is another engine's)."""
    i, dep = plan.inputs, plan.load.deployment if plan.load else None
    backends: list[dict[str, Any]] = []
    route: list[dict[str, Any]] = []
    has_onprem = dep is None or dep.location != "none"
    if has_onprem:
        engine = plan.layout.planned.engine
        batch = r.batch if r else (dep.max_concurrency_per_replica if dep else i.max_num_seqs)
        fleet = dep.replicas_max if dep else 1
        location = "onprem" if dep is None or dep.location == "onprem" else "cloud"
        onprem: dict[str, Any] = {
            "name": f"{'onprem' if location == 'onprem' else 'fleet'}-{_name(i.model.name)}", "url": onprem_url,
            "location": location,
            "kind": "ferry" if engine == FERRY else "openai", "max_concurrency": max(1, fleet) * batch,
            "timeout": 120, "input_per_mtok": round(dep.input_per_mtok, 4) if dep else 0.0,
            "output_per_mtok": round(dep.output_per_mtok, 4) if dep else 0.0}
        backends.append(onprem)
        route.append({"backend": onprem["name"], "model": i.model.name if engine == FERRY else hf_repo(i.model)})
    if dep is not None:
        over = _overflow_backend(plan, dep, dep.input_per_mtok, dep.output_per_mtok)
        if over is not None:
            backends.append(over.config)
            route.append({"backend": over.config["name"], "model": over.model})
    model: dict[str, Any] = {"name": i.model.name, "deployments": route, "max_output_tokens": i.context}
    return {"backends": backends, "models": [model], **_gateway_settings(plan, has_onprem),
            "database": "sqlite:///ferry-gateway.db"}


# ---- values.yaml (Helm) -----------------------------------------------------------------------------


def helm_values(plan: Plan, r: _Replica, s: EmitSettings, gateway: dict[str, Any]) -> dict[str, Any]:
    """Values for deploy/helm/ferry: its one model entry replaces the chart's example model."""
    on_gpu = r.gpus > 0
    requests: dict[str, Any] = {"cpu": f"{r.cpus:g}", "memory": _kube_gib(r.memory_bytes)}
    limits: dict[str, Any] = {"memory": _kube_gib(r.memory_bytes)}
    if on_gpu:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = r.gpus
    model: dict[str, Any] = {
        "name": r.name, "model": s.serve_model, "servedModelName": r.served_name,
        "replicas": r.replicas,
        # NOTE: the chart adds --model, --served-model-name, --host, --port and the shutdown flags itself
        "args": [a for a in r.serve_args[2:]],
        "resources": {"requests": requests, "limits": limits},
        # NOTE: Kubernetes' HPA cannot scale to zero replicas; hours needing none keep one
        "autoscaling": {"enabled": r.autoscaled, "minReplicas": max(1, r.replicas_min),
                        "maxReplicas": r.replicas_max},
    }
    if on_gpu:
        model["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    onprem, *extra = gateway["backends"]
    settings = {k: v for k, v in gateway.items() if k not in ("backends", "models", "database")}
    deployments = gateway["models"][0]["deployments"][1:]
    return {
        "image": {"device": "cuda" if on_gpu else "cpu"},
        "models": [model],
        "gateway": {
            "backendDefaults": {k: onprem[k] for k in ("max_concurrency", "timeout", "input_per_mtok",
                                                       "output_per_mtok")},
            "extraBackends": extra,
            "extraDeployments": {r.served_name: deployments} if deployments else {},
            "config": settings,
        },
    }


# ---- README.md --------------------------------------------------------------------------------------


def _readme(plan: Plan, r: _Replica | None, s: EmitSettings, files: list[str], gateway: dict[str, Any]) -> str:
    i, dep = plan.inputs, plan.load.deployment if plan.load else None
    lines = [f"# Deploying {i.model.name} as `ferry plan` recommends", "",
             f"Generated by `ferry plan --emit` for {i.model.name} in {i.dtype.name} (KV {i.kv_dtype.name}), "
             f"context {i.context:,}, on {i.gpu.name} ({i.gpu.description}).", ""]
    if dep is None:
        lines += ["**Memory-only plan** (no `--rps` or `--traffic`): one replica, no autoscaling, and the gateway "
                  "prices its tokens at $0. Give traffic to size replicas, autoscaling bounds and prices.", ""]
    else:
        t = plan.load.traffic if plan.load else None
        assert t is not None and plan.load is not None
        lines += [f"Recommended option: **{plan.load.recommendation.option}** "
                  f"(${plan.load.recommendation.monthly_usd:,.0f}/month). Traffic: mean {t.mean_rps:.3g} req/s, peak "
                  f"{t.peak_rps:.3g} req/s, {t.prompt_tokens:,} prompt + {t.output_tokens:,} output tokens, "
                  f"{t.restricted_share:.0%} restricted to on-prem.", ""]
    lines += ["## Files", ""]
    if CLUSTER in files and r is not None:
        scale = (f"autoscaling {r.replicas_min}..{r.replicas_max} replicas (the hourly profile's least and most)"
                 if r.autoscaled else plural(r.replicas, "replica"))
        lines += [f"- `{CLUSTER}`: Ray Serve through `ferry cluster deploy`: {scale} of `ferry serve "
                  f"{s.serve_model}` with {r.cpus:g} CPU{'' if r.cpus == 1 else 's'}, "
                  f"{plural(r.gpus, 'GPU') if r.gpus else 'no GPU'} and {_gib(r.memory_bytes)} "
                  "of memory each. Apply: `ferry cluster deploy cluster.yaml --ray-address auto` (on the Ray "
                  "head; `ferry cluster status` shows the replicas).",
                  f"- `{VALUES}`: Helm values for ferry's chart (one model, GPU resources, HPA bounds, the gateway "
                  "wired to the model's Service). Apply: `helm upgrade --install ferry deploy/helm/ferry -f "
                  "values.yaml` (the gateway needs its Secret first: docs/deploy.md)."]
    lines.append(f"- `{GATEWAY}`: `ferry gateway` on its own: backends priced from the plan, overflow "
                 "thresholds, data classes. Check, then serve: `ferry gateway check gateway.yaml && ferry gateway "
                 "--config gateway.yaml`. Its on-prem URL is the Ray Serve ingress "
                 f"(`http://127.0.0.1:{SERVE_PORT}/v1`): point it at your head node or load balancer.")
    lines.append("")
    lines += ["## Secrets", "",
              "No file holds a secret. Set these environment variables where the gateway runs (in Kubernetes: "
              "its Secret): `FERRY_MASTER_KEY`"]
    extra_env = sorted({str(b["api_key_env"]) for b in gateway["backends"] if b.get("api_key_env")})
    if extra_env:
        lines[-1] += ", " + ", ".join(f"`{e}`" for e in extra_env)
    lines[-1] += "."
    lines.append("")
    if not plan.layout.ferry_runs:
        a = plan.layout
        lines += ["## Not a ferry layout", "",
                  f"`ferry serve` cannot run this layout: {a.ferry_why_not}. No `{CLUSTER}` or `{VALUES}` is "
                  f"written (they would not start). `{GATEWAY}` routes to an on-prem {a.planned.engine} backend "
                  "(placeholder URL: replace it) started with:", "", f"    {a.planned.command}", "",
                  f"{a.planned.engine}'s memory model: {a.planned.memory_model}.", ""]
        ferry_alts = [alt for alt in a.alternatives if alt.ferry_runs]
        if ferry_alts:
            lines += ["What ferry can run instead (plan and emit again with these settings):", ""]
            lines += [f"- {alt.note}: `{alt.command}`" for alt in ferry_alts]
            lines.append("")
    lines += ["## What the plan assumed", ""]
    mem = plan.memory
    lines += [f"- weights {mem.weight_bytes / 1e9:,.2f} GB, KV {mem.kv_bytes_per_token:,.0f} B/token, KV pool "
              f"{mem.per_gpu_kv_bytes / GIB:,.2f} GiB per device: {mem.kv_tokens:,} tokens, "
              f"{plural(mem.max_concurrent_seqs, 'sequence')} at full context",
              f"- efficiency: {i.efficiency_source}"]
    if dep is not None and plan.load is not None:
        lines += [f"- SLOs: TTFT {i.slo_ttft_s * 1000:g} ms, ITL {i.slo_itl_s * 1000:g} ms; one replica runs "
                  f"{plural(dep.max_concurrency_per_replica, 'sequence')} within them and carries "
                  f"{plan.load.capacity_rps:.3g} req/s",
                  f"- replicas per hour (UTC hour 0..23): {' '.join(str(n) for n in dep.hourly_replicas)}",
                  f"- self-hosted fleet: {dep.location}; overflow: {dep.overflow_target or 'none'}; on-prem "
                  f"${dep.input_per_mtok:.4f}/${dep.output_per_mtok:.4f} per Mtok in/out (amortized cost)"]
        if dep.location == "none":
            lines.append("- the recommendation self-hosts nothing: no cluster or Helm file; the gateway routes "
                         "every request to the API (PII detection is off: restricted requests would have nowhere "
                         "to go)")
    placeholders = "- to replace: URLs on `.example` hosts and an API's model name"
    if r is not None and s.replica_cpus is None:
        placeholders += f"; {r.cpus:g} CPUs per replica is a default (`--replica-cpus`)"
    lines += [placeholders, ""]
    return "\n".join(lines) + "\n"


# ---- writing ----------------------------------------------------------------------------------------


_HEADERS = {
    CLUSTER: "# ferry cluster deploy cluster.yaml: Ray Serve replicas of ferry serve, as `ferry plan` sized them\n",
    VALUES: "# helm upgrade --install ferry deploy/helm/ferry -f values.yaml (values as `ferry plan` sized them)\n",
    GATEWAY: "# ferry gateway --config gateway.yaml: backends priced by `ferry plan`; secrets come from the\n"
             "# environment variables named by api_key_env and master_key_env, never from this file\n",
}


def render(plan: Plan, s: EmitSettings) -> dict[str, str]:
    """File name -> text, for everything ``plan`` can deploy."""
    dep = plan.load.deployment if plan.load else None
    runs = plan.layout.ferry_runs
    r = _replica(plan, s) if runs else None
    out: dict[str, str] = {}
    if runs:
        url = f"http://127.0.0.1:{SERVE_PORT}/v1"
    else:
        url = f"http://{plan.layout.planned.engine.lower()}-{_name(plan.inputs.model.name)}.onprem.example:8000/v1"
    gw = gateway_config(plan, r, url)
    if r is not None and (dep is None or dep.location != "none"):
        out[CLUSTER] = _HEADERS[CLUSTER] + _dump(cluster_config(r, s))
        out[VALUES] = _HEADERS[VALUES] + _dump(helm_values(plan, r, s, gw))
    out[GATEWAY] = _HEADERS[GATEWAY] + _dump(gw)
    out[README] = _readme(plan, r, s, list(out), gw)
    return out


def _dump(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=110)


def write(plan: Plan, out_dir: str | Path, s: EmitSettings) -> list[Path]:
    """Write the files into ``out_dir`` (created; an existing non-empty folder needs ``force``)."""
    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise PlannerError(f"--emit {str(d)!r} exists and is not a folder")
    if d.is_dir() and not s.force:
        try:
            present = sorted(p.name for p in d.iterdir())
        except OSError as e:
            raise PlannerError(f"--emit: cannot read {str(d)!r}: {e.strerror or e}") from e
        if present:
            raise PlannerError(f"--emit {str(d)!r} is not empty ({', '.join(present[:3])}"
                               f"{', ...' if len(present) > 3 else ''}); use --force to write into it")
    files = render(plan, s)
    written = []
    try:
        d.mkdir(parents=True, exist_ok=True)
        for name in EMITTED:
            path = d / name
            if name in files:
                path.write_text(files[name], encoding="utf-8")
                written.append(path)
            elif path.is_file():
                path.unlink()  # NOTE: --force: a stale file of an earlier emit must not deploy something else
    except OSError as e:
        raise PlannerError(f"--emit: cannot write into {str(d)!r}: {e.strerror or e}") from e
    return written
