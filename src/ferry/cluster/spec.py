"""What a cluster deployment is: models, replicas or autoscaling, resources; read from YAML.

A model's engine is described by ``ferry serve`` flags (``args``), so each replica builds it
exactly as ``ferry serve`` does. Example::

    host: 127.0.0.1
    port: 8000
    models:
      - name: smol                    # Serve application name; route prefix / (one model) or /smol
        args: [smollm2-135m-instruct, --max-num-seqs, "8"]
        replicas: 2                   # or: autoscaling: {min_replicas, max_replicas, ...}
        resources: {num_cpus: 1, num_gpus: 0, memory: 2GiB}
        prefix_routing: true
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ferry.config import EngineConfig, ServerConfig
from ferry.server.flags import (
    ServeArgumentParser,
    add_arguments,
    configs_from_args,
    parse_bytes,
)


@dataclass(frozen=True)
class AutoscalingSpec:
    min_replicas: int = 1
    max_replicas: int = 2
    # ferry load units per replica (running + waiting sequences, a full KV pool counts as
    # max_num_seqs): the autoscaler aims for this many per replica
    target_load: float = 2.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    metrics_interval_s: float = 1.0
    look_back_period_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"autoscaling: need 0 <= min_replicas <= max_replicas and "
                             f"max_replicas >= 1, got {self.min_replicas}..{self.max_replicas}")
        if self.target_load <= 0:
            raise ValueError(f"autoscaling: target_load must be positive, got {self.target_load}")


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None  # bytes

    @property
    def threads(self) -> int:
        """OpenMP / torch threads of the replica's engine: its CPUs (at least one)."""
        return max(1, int(self.num_cpus))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    serve_args: tuple[str, ...] = ()
    num_replicas: int = 1
    autoscaling: AutoscalingSpec | None = None
    resources: Resources = field(default_factory=Resources)
    prefix_routing: bool = True
    route_prefix: str = "/"
    # `ferry serve --replicas`: the namespace already parsed (then serve_args is unused)
    namespace: argparse.Namespace | None = None

    def serve_namespace(self) -> argparse.Namespace:
        return self.namespace if self.namespace is not None else parse_serve_args(self.serve_args)

    def configs(self) -> tuple[EngineConfig, ServerConfig]:
        """The engine and server configs ``ferry serve`` would build from these flags."""
        return configs_from_args(self.serve_namespace())


@dataclass(frozen=True)
class ClusterSpec:
    models: tuple[ModelSpec, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    ray_address: str | None = None


def parse_serve_args(argv: Sequence[str]) -> argparse.Namespace:
    """``ferry serve``'s flags -> its namespace (a bad flag: ValueError, one line)."""
    parser = ServeArgumentParser(prog="ferry serve", add_help=False)
    add_arguments(parser, "serve")
    try:
        return parser.parse_args(list(argv))
    except SystemExit as exc:  # NOTE: ServeArgumentParser.error already printed the one line
        raise ValueError(f"bad ferry serve flags {list(argv)!r}") from exc


def load_spec(path: str | Path) -> ClusterSpec:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected a mapping with `models`")  # noqa: TRY004 (config error)
    return spec_from_dict(raw)


def spec_from_dict(raw: Mapping[str, Any]) -> ClusterSpec:
    known = {"host", "port", "ray_address", "models"}
    _no_unknown("cluster", raw, known)
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ValueError("cluster: `models` must be a non-empty list")
    single = len(models_raw) == 1
    models = tuple(_model_spec(m, single) for m in models_raw)
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"cluster: model names must be unique, got {names}")
    return ClusterSpec(models=models, host=str(raw.get("host", "127.0.0.1")),
                       port=int(raw.get("port", 8000)), ray_address=raw.get("ray_address"))


def _model_spec(raw: Any, single: bool) -> ModelSpec:
    if not isinstance(raw, Mapping) or "name" not in raw:
        raise ValueError("cluster: each model needs a mapping with a `name`")
    name = str(raw["name"])
    _no_unknown(f"model {name}", raw, {"name", "args", "replicas", "autoscaling", "resources",
                                       "prefix_routing", "route_prefix"})
    if "replicas" in raw and "autoscaling" in raw:
        raise ValueError(f"model {name}: give `replicas` or `autoscaling`, not both")
    args = raw.get("args", [])
    if not isinstance(args, list):
        raise ValueError(f"model {name}: `args` must be a list of `ferry serve` flags")  # noqa: TRY004 (config error)
    auto = _mapping(f"model {name} autoscaling", raw.get("autoscaling"))
    res = _mapping(f"model {name} resources", raw.get("resources")) or {}
    _no_unknown(f"model {name} resources", res, {"num_cpus", "num_gpus", "memory"})
    if auto is not None:
        _no_unknown(f"model {name} autoscaling", auto,
                    set(AutoscalingSpec.__dataclass_fields__))
    memory = res.get("memory")
    try:
        spec = ModelSpec(
            name=name, serve_args=tuple(str(a) for a in args),
            num_replicas=int(raw.get("replicas", 1)),
            autoscaling=AutoscalingSpec(**{k: (int(v) if k.endswith("_replicas") else float(v))
                                           for k, v in auto.items()}) if auto is not None else None,
            resources=Resources(num_cpus=float(res.get("num_cpus", 1)),
                                num_gpus=float(res.get("num_gpus", 0)),
                                memory=parse_bytes(str(memory)) if memory is not None else None),
            prefix_routing=bool(raw.get("prefix_routing", True)),
            route_prefix=str(raw.get("route_prefix", "/" if single else f"/{name}")))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model {name}: {exc}") from exc
    if not spec.route_prefix.startswith("/"):
        raise ValueError(f"model {name}: route_prefix must start with /, got {spec.route_prefix!r}")
    if spec.num_replicas < 1:
        raise ValueError(f"model {name}: replicas must be >= 1, got {spec.num_replicas}")
    spec.configs()  # NOTE: refuse bad serve flags before Ray starts anything
    return spec


def _mapping(where: str, value: Any) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")  # noqa: TRY004 (config error)
    return value


def _no_unknown(where: str, raw: Mapping[str, Any], known: set[str]) -> None:
    extra = sorted(set(raw) - known)
    if extra:
        raise ValueError(f"{where}: unknown key(s) {', '.join(extra)} (known: {', '.join(sorted(known))})")
