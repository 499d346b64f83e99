"""`ferry cluster deploy CONFIG.yaml | status | shutdown`, and `ferry serve MODEL --replicas N`.

``ferry serve --replicas N [--ray-address ADDR]`` joins ADDR (or starts a local Ray), serves N
replicas on --host/--port until SIGINT/SIGTERM, then deletes the application and stops Serve
(and the local Ray it started).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from ferry.cluster.spec import ClusterSpec, ModelSpec, Resources, load_spec
from ferry.engine.preflight import check as preflight_check
from ferry.server.flags import configs_from_args
from ferry.server.logging import configure_logging

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    d = sub.add_parser("deploy", help="deploy the models of a YAML file (see docs/scale-out.md)")
    d.add_argument("config", help="the cluster YAML")
    d.add_argument("--ray-address", default=None,
                   help="the Ray cluster to join (default: the file's ray_address, else 'auto')")
    for name, text in (("status", "Serve's applications, deployments and replicas (JSON)"),
                       ("shutdown", "delete every ferry application and stop Serve")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--ray-address", default="auto", help="(default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return serve_replicas(args)
    from ferry.cluster import (
        deploy as cluster,  # NOTE: imports ray: only when a command runs
    )

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action == "deploy":
        try:
            spec = load_spec(args.config)
        except ValueError as exc:
            print(f"ferry cluster: {exc}", file=sys.stderr)
            return 2
        address = args.ray_address or spec.ray_address or "auto"
        spec = ClusterSpec(spec.models, spec.host, spec.port, address)
        cluster.deploy(spec)
        return 0
    try:
        cluster.connect(args.ray_address)
    except ConnectionError as exc:
        print(f"ferry cluster: no Ray cluster at {args.ray_address}: {exc}", file=sys.stderr)
        return 1
    if args.action == "status":
        print(json.dumps(cluster.status(), indent=2))
        return 0
    cluster.shutdown()
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

    model = ModelSpec(name="ferry", num_replicas=args.replicas,
                      resources=Resources(num_cpus=args.replica_cpus, num_gpus=args.replica_gpus),
                      prefix_routing=args.prefix_routing, namespace=args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    spec = ClusterSpec((model,), server_config.host, server_config.port, args.ray_address)
    try:
        cluster.deploy(spec)
        logger.info("serving %d replica(s) on http://%s:%d", args.replicas, spec.host, spec.port)
        stop.wait()
        logger.info("shutting down")
    finally:
        # NOTE: a joined cluster keeps its Serve instance (other applications may run there)
        cluster.shutdown(["ferry"] if args.ray_address else None)
        if not args.ray_address:
            import ray

            ray.shutdown()
    return 0
