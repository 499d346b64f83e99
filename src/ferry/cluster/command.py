"""`ferry cluster deploy CONFIG.yaml | status | shutdown`, and `ferry serve MODEL --replicas N`.

``ferry serve --replicas N`` starts a private local Ray instance (or joins ``--ray-address``),
serves N replicas on --host/--port until SIGINT/SIGTERM, then deletes its application; a Ray
instance it started is stopped with it (its Serve, replicas and Ray processes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from ferry.cluster.spec import ClusterSpec, ModelSpec, Resources, load_spec
from ferry.engine.preflight import check as preflight_check
from ferry.server.flags import configs_from_args
from ferry.server.logging import configure_logging

logger = logging.getLogger(__name__)

SERVE_APP = "ferry"  # the application `ferry serve --replicas` deploys


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    d = sub.add_parser("deploy", help="deploy the models of a YAML file (see docs/scale-out.md)")
    d.add_argument("config", help="the cluster YAML")
    d.add_argument("--ray-address", default=None,
                   help="the Ray cluster to join (default: the file's ray_address, else 'auto')")
    s = sub.add_parser("status", help="ferry's applications: replicas, their state and load (JSON)")
    s.add_argument("--ray-address", default="auto", help="(default: %(default)s)")
    x = sub.add_parser("shutdown", help="delete every Serve application and stop Serve")
    x.add_argument("--ray-address", default="auto", help="(default: %(default)s)")
    x.add_argument("--app", action="append", default=None, metavar="NAME",
                   help="delete only this application (repeatable); Serve keeps running")


def run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return serve_replicas(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec: ClusterSpec | None = None
    if args.action == "deploy":
        try:
            spec = load_spec(args.config)  # NOTE: before Ray is imported: a bad file fails fast
        except ValueError as exc:
            print(f"ferry cluster: {exc}", file=sys.stderr)
            return 2
    from ferry.cluster import (
        deploy as cluster,  # NOTE: imports ray: only when a command runs
    )

    address = args.ray_address or (spec.ray_address if spec else None) or "auto"
    try:
        cluster.connect(address)
    except ConnectionError as exc:
        print(f"ferry cluster: no Ray cluster at {address}: {exc}", file=sys.stderr)
        return 1
    if spec is not None:
        cluster.deploy(ClusterSpec(spec.models, spec.host, spec.port, address))
        return 0
    if args.action == "status":
        print(json.dumps(cluster.status(), indent=2))
        return 0
    cluster.shutdown(args.app)
    return 0


def serve_replicas(args: argparse.Namespace) -> int:
    """``ferry serve --replicas N``: deploy, block until a signal, tear down."""
    try:
        engine_config, server_config = configs_from_args(args)
        if args.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
        preflight_check(engine_config)
    except ValueError as exc:
        print(f"ferry serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, server_config.log_format)
    from ferry.cluster import deploy as cluster

    model = ModelSpec(name=SERVE_APP, num_replicas=args.replicas,
                      resources=Resources(num_cpus=args.replica_cpus, num_gpus=args.replica_gpus),
                      prefix_routing=args.prefix_routing, namespace=args)
    own_ray = args.ray_address is None
    # NOTE: a private instance ("local"), never a running one found by chance: on exit we stop
    # exactly what we started. Its logical CPUs cover the replicas asked for.
    address = "local" if own_ray else args.ray_address
    needed = int(args.replicas * args.replica_cpus + 0.999)
    cluster.connect(address, num_cpus=max(os.cpu_count() or 1, needed) if own_ray else None)
    # NOTE: after ray.init, which installs its own SIGTERM handler (it logs and aborts)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    spec = ClusterSpec((model,), server_config.host, server_config.port, address)
    try:
        cluster.deploy(spec)
        logger.info("serving %d replica(s) on http://%s:%d", args.replicas, spec.host, spec.port)
        stop.wait()
        logger.info("shutting down")
    finally:
        # NOTE: a joined cluster keeps its Serve instance (other applications may run there)
        cluster.shutdown(None if own_ray else [SERVE_APP])
        if own_ray:
            import ray

            ray.shutdown()
    return 0
