"""A ``ModelSpec`` -> a Ray Serve application (replicas + ingress); run, status, shutdown."""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from ferry.cluster.autoscaling import FerryLoadPolicy
from ferry.cluster.ingress import FerryIngress
from ferry.cluster.replica import FerryReplica
from ferry.cluster.spec import ClusterSpec, ModelSpec
from ferry.cluster.stats import HUB_NAMESPACE, hub_name

logger = logging.getLogger(__name__)

HEALTH_CHECK_PERIOD_S = 2.0
# NOTE: a model load takes seconds to minutes (download, kernels built on first use)
HEALTH_CHECK_TIMEOUT_S = 30.0
GRACEFUL_SHUTDOWN_S = 10.0


def build_application(spec: ModelSpec) -> Any:
    """The Serve application for one model: ``FerryIngress`` bound to ``FerryReplica``."""
    engine_config, server_config = spec.configs()
    res = spec.resources
    actor_options: dict[str, Any] = {
        "num_cpus": res.num_cpus, "num_gpus": res.num_gpus,
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(res.threads),
                                     "TOKENIZERS_PARALLELISM": "false"}}}
    if res.memory is not None:
        actor_options["memory"] = res.memory
    max_num_seqs = engine_config.scheduler.max_num_seqs
    options: dict[str, Any] = {
        "name": "FerryReplica", "ray_actor_options": actor_options,
        # NOTE: the engine batches max_num_seqs and queues the rest; ferry's admission at the
        # ingress answers 429 before Ray's own back-pressure would
        "max_ongoing_requests": max_num_seqs + server_config.max_queue,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
    }
    if spec.prefix_routing:
        options["request_router_config"] = RequestRouterConfig(
            request_router_class="ferry.cluster.router:PrefixAwareRouter",
            request_routing_stats_period_s=1.0, request_routing_stats_timeout_s=5.0)
    if spec.autoscaling is not None:
        a = spec.autoscaling
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=a.min_replicas, max_replicas=a.max_replicas,
            initial_replicas=max(a.min_replicas, 1),
            metrics_interval_s=a.metrics_interval_s, look_back_period_s=a.look_back_period_s,
            upscale_delay_s=a.upscale_delay_s, downscale_delay_s=a.downscale_delay_s,
            policy=AutoscalingPolicy(policy_function=FerryLoadPolicy,
                                     policy_kwargs={"target_load": a.target_load}))
        replicas_max = a.max_replicas
    else:
        options["num_replicas"] = spec.num_replicas
        replicas_max = spec.num_replicas
    replica = serve.deployment(FerryReplica).options(**options)
    ingress = serve.deployment(serve.ingress()(FerryIngress)).options(
        name="FerryIngress", num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000, graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S)
    return ingress.bind(replica.bind(spec.serve_namespace(), res.threads, spec.name),
                        server_config, spec.name,
                        (max_num_seqs + server_config.max_queue) * replicas_max
                        - server_config.max_queue)


def connect(address: str | None, *, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at ``address`` ("auto": the local one), or start a local one."""
    if ray.is_initialized():
        return
    local = address in (None, "local")
    ray.init(address=address, namespace=HUB_NAMESPACE, include_dashboard=False,
             num_cpus=num_cpus if local else None, log_to_driver=False)


def deploy(spec: ClusterSpec) -> None:
    """Start Serve's HTTP proxy on spec.host:port and run every model's application (blocks
    until each is running: its replicas loaded their models)."""
    connect(spec.ray_address)
    serve.start(http_options={"host": spec.host, "port": spec.port})
    for model in spec.models:
        t0 = time.monotonic()
        serve.run(build_application(model), name=model.name, route_prefix=model.route_prefix,
                  blocking=False)
        logger.info("%s: running at http://%s:%d%s (%.1fs)", model.name, spec.host, spec.port,
                    model.route_prefix, time.monotonic() - t0)


def status() -> dict[str, Any]:
    """Serve's status of each application and deployment, and each ferry replica's engine
    (from the application's stats hub: pid, healthy, load, queue, KV usage), as plain data."""
    st = serve.status()
    out: dict[str, Any] = {"proxies": {k: str(v) for k, v in st.proxies.items()},
                           "applications": {}}
    for name, app in st.applications.items():
        out["applications"][name] = {
            "status": str(app.status), "message": app.message,
            "deployments": {d: {"status": str(s.status),
                                "replicas": {str(k): v for k, v in s.replica_states.items()},
                                "message": s.message} for d, s in app.deployments.items()},
            "replicas": _replica_stats(name)}
    return out


def _replica_stats(app_name: str) -> list[dict[str, Any]]:
    try:
        hub = ray.get_actor(hub_name(app_name), namespace=HUB_NAMESPACE)
    except ValueError:
        return []  # NOTE: not a ferry application, or no replica has reported yet
    now = time.time()
    return [r.as_dict(now) for r in ray.get(hub.snapshot.remote(), timeout=30)]


def shutdown(app_names: list[str] | None = None) -> None:
    """Delete the applications (all when none named) and their stats hubs."""
    names = app_names if app_names is not None else list(serve.status().applications)
    for name in names:
        serve.delete(name)
        try:
            ray.kill(ray.get_actor(hub_name(name), namespace=HUB_NAMESPACE))
        except ValueError:
            pass  # NOTE: no hub: the application never started a replica
    if app_names is None:
        serve.shutdown()
