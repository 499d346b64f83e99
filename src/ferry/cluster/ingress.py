"""The ingress deployment: ferry's own FastAPI app (``build_app``) over a ``RemoteEngine``.

Why this shape: the router must see the prompt's token ids to route by prefix, and a Ray Serve
request router sees a call's arguments; HTTP requests reach a replica as raw ASGI messages, with
the body not yet read. So the ingress tokenizes (ferry's routes already do) and calls the replica
deployment with token ids. Per-replica figures come from the replicas' stats hub.

Added to ferry's app here: per-replica series on ``/metrics`` (``ferry:replica_*{replica=...}``;
the standard ``ferry:*`` engine series are the sums over the replicas) and ``/health/replicas``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from ray.serve.handle import DeploymentHandle

from ferry.cluster.remote_engine import RemoteEngine
from ferry.cluster.stats import get_hub
from ferry.config import ServerConfig
from ferry.server.app import build_app
from ferry.server.state import ServerState, get_state


class ReplicaCollector(Collector):
    """Each replica's engine series, labelled ``replica``, read from the hub's last snapshot."""

    def __init__(self, engine: RemoteEngine, model_name: str) -> None:
        self._engine = engine
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "replica"]
        now = time.time()
        fams = {
            "up": GaugeMetricFamily("ferry:replica_up", "1 while the replica reports a running "
                                    "engine.", labels=labels),
            "running": GaugeMetricFamily("ferry:replica_num_requests_running",
                                         "Requests in the replica's running batch.", labels=labels),
            "waiting": GaugeMetricFamily("ferry:replica_num_requests_waiting",
                                         "Requests waiting in the replica's queue.", labels=labels),
            "kv": GaugeMetricFamily("ferry:replica_kv_cache_usage_perc",
                                    "The replica's KV-cache usage.", labels=labels),
            "load": GaugeMetricFamily("ferry:replica_load", "ferry's load signal (autoscaling, "
                                      "routing).", labels=labels),
            "queries": CounterMetricFamily("ferry:replica_prefix_cache_queries",
                                           "Prompt tokens looked up in the replica's prefix cache.",
                                           labels=labels),
            "hits": CounterMetricFamily("ferry:replica_prefix_cache_hits",
                                        "Prompt tokens found in the replica's prefix cache.",
                                        labels=labels),
        }
        for r in self._engine.replicas:
            values = [self._model_name, r.replica]
            fams["up"].add_metric(values, 1.0 if r.fresh(now) and r.running else 0.0)
            fams["running"].add_metric(values, r.stats.num_running)
            fams["waiting"].add_metric(values, r.stats.num_waiting)
            fams["kv"].add_metric(values, r.stats.kv_cache_usage)
            fams["load"].add_metric(values, r.load)
            fams["queries"].add_metric(values, r.stats.prefix_cache_queries_total)
            fams["hits"].add_metric(values, r.stats.prefix_cache_hits_total)
        yield from fams.values()


def _replicas_route(state: ServerState) -> JSONResponse:
    engine = state.engine
    if not isinstance(engine, RemoteEngine):
        return JSONResponse({"error": {"message": "the model is loading", "type": "Service "
                                       "Unavailable", "param": None, "code": None}},
                            status_code=503)
    now = time.time()
    replicas = [r.as_dict(now) for r in engine.replicas]
    healthy = sum(1 for r in replicas if r["healthy"])
    return JSONResponse({"status": "ok" if healthy else "unavailable", "healthy": healthy,
                         "replicas": replicas}, status_code=200 if healthy else 503)


class FerryIngress:
    """The ingress deployment class (``serve.ingress()`` late-binds ``__serve_build_asgi_app__``)."""

    def __init__(self, replicas: DeploymentHandle, server_config: ServerConfig, app_name: str,
                 max_num_seqs: int) -> None:
        self._replicas = replicas
        self._config = server_config
        self._hub = get_hub(app_name)
        self._max_num_seqs = max_num_seqs
        self._collector_added = False

    def __serve_build_asgi_app__(self) -> FastAPI:
        def connect() -> RemoteEngine:
            engine = RemoteEngine.connect(self._replicas, self._hub)
            engine.after_poll = lambda: self._add_collector(state)
            return engine

        # NOTE: admission at the ingress bounds what all replicas hold together
        app = build_app(connect, self._config, max_num_seqs=self._max_num_seqs)
        state = get_state(app)

        @app.get("/health/replicas")
        async def health_replicas() -> JSONResponse:
            return _replicas_route(state)

        return app

    def _add_collector(self, state: ServerState) -> None:
        # NOTE: the app's registry exists once the engine is set (ServerState.set_engine)
        if self._collector_added or state.metrics is None:
            return
        if isinstance(state.engine, RemoteEngine):
            state.metrics.registry.register(ReplicaCollector(state.engine,
                                                             state.metrics.model_name))
            self._collector_added = True
