"""Gateway configuration: frozen dataclasses parsed from YAML.

Every dataclass validates itself in ``__post_init__`` and raises ``ConfigError`` (a ``ValueError``)
naming the offending key with its path, e.g. ``models[0].deployments[1].backend``. Unknown keys are
errors too, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

LOCATIONS = ("onprem", "cloud")
BACKEND_KINDS = ("ferry", "openai", "azure", "anthropic")
# NOTE: the Messages API has no embeddings; a kind listed here is never sent /v1/embeddings
NO_EMBEDDINGS_KINDS = ("anthropic",)
ANTHROPIC_VERSION = "2023-06-01"  # the anthropic-version header's default (the Messages API's)
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")  # ${NAME} in a header value
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
POLICIES = ("onprem-first", "least-load", "lowest-cost", "round-robin")
PII_DETECTORS = ("email", "phone", "card", "iban", "national_id")


class ConfigError(ValueError):
    """A configuration value is wrong; the message starts with the key's path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def _check_url(key: str, url: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(key, f"must be an http(s) URL with a host, got {url!r}")
    try:
        parsed.port  # noqa: B018  # NOTE: urlparse raises ValueError only when .port is read
    except ValueError as e:
        raise ConfigError(key, f"bad port in {url!r}") from e


def _positive(key: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or value <= 0:
        raise ConfigError(key, f"must be a positive number, got {value!r}")


def _non_negative(key: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or value < 0:
        raise ConfigError(key, f"must be a non-negative number, got {value!r}")


@dataclass(frozen=True)
class BackendConfig:
    """One upstream: an OpenAI-compatible base URL (ferry, vLLM, llama.cpp, OpenAI, …)."""

    name: str
    url: str
    location: str = "onprem"
    kind: str = "openai"
    api_key_env: str | None = None
    max_concurrency: int = 16
    timeout: float = 60.0  # seconds to connect and to each byte, the first included
    connect_timeout: float = 5.0
    input_per_mtok: float = 0.0  # USD per million prompt tokens; amortized cost for on-prem
    output_per_mtok: float = 0.0
    metrics_url: str | None = None  # ferry backends: defaults to <url without /v1>/metrics
    # extra request headers; a value may name environment variables as ${NAME} (secrets stay out of
    # the file and out of the logs)
    headers: Mapping[str, str] = field(default_factory=dict)
    # azure: the api-version query parameter (or in the url's ?api-version=); anthropic: the
    # anthropic-version header (default ANTHROPIC_VERSION)
    api_version: str | None = None
    # azure: a Microsoft Entra ID token sent as a bearer token instead of the api-key header
    azure_ad_token_env: str | None = None
    path: str = "backends[?]"  # where it came from, for messages

    def __post_init__(self) -> None:
        p = self.path
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.name):
            raise ConfigError(f"{p}.name", f"must be letters, digits, '_', '.', '-', got {self.name!r}")
        _check_url(f"{p}.url", self.url)
        self._check_provider(p)
        if self.location not in LOCATIONS:
            raise ConfigError(f"{p}.location", f"must be one of {LOCATIONS}, got {self.location!r}")
        if self.kind not in BACKEND_KINDS:
            raise ConfigError(f"{p}.kind", f"must be one of {BACKEND_KINDS}, got {self.kind!r}")
        if not isinstance(self.max_concurrency, int) or isinstance(self.max_concurrency, bool) \
                or self.max_concurrency <= 0:
            raise ConfigError(f"{p}.max_concurrency", f"must be a positive integer, got {self.max_concurrency!r}")
        _positive(f"{p}.timeout", self.timeout)
        _positive(f"{p}.connect_timeout", self.connect_timeout)
        _non_negative(f"{p}.input_per_mtok", self.input_per_mtok)
        _non_negative(f"{p}.output_per_mtok", self.output_per_mtok)
        if self.metrics_url is not None:
            _check_url(f"{p}.metrics_url", self.metrics_url)
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(self.api_key_env)):
            raise ConfigError(f"{p}.api_key_env", f"must be an environment variable name, got {self.api_key_env!r}")

    def _check_provider(self, p: str) -> None:
        """What each kind needs of its URL, version and credentials; headers for every kind."""
        query = parse_qs(urlparse(self.url).query)
        if self.kind == "azure":
            in_url = query.get("api-version", [None])[0]
            if set(query) - {"api-version"}:
                raise ConfigError(f"{p}.url", f"an Azure deployment URL takes only ?api-version=, got {self.url!r}")
            if in_url and self.api_version and in_url != self.api_version:
                raise ConfigError(f"{p}.api_version", f"{self.api_version!r} differs from the url's "
                                                      f"api-version {in_url!r}")
            if not (in_url or self.api_version):
                raise ConfigError(f"{p}.api_version", "is required for kind azure (or ?api-version= in the url)")
            if "/openai/deployments/" not in urlparse(self.url).path:
                raise ConfigError(f"{p}.url", "must be an Azure OpenAI deployment URL "
                                              f"(https://RESOURCE.openai.azure.com/openai/deployments/NAME), got {self.url!r}")
            if self.api_key_env and self.azure_ad_token_env:
                raise ConfigError(f"{p}.azure_ad_token_env", "give api_key_env or azure_ad_token_env, not both")
        else:
            if query or urlparse(self.url).query:
                hint = " (an Azure deployment URL needs kind: azure)" if "api-version" in query else ""
                raise ConfigError(f"{p}.url", f"must be a base URL without a query string, got {self.url!r}{hint}")
            if self.azure_ad_token_env is not None:
                raise ConfigError(f"{p}.azure_ad_token_env", f"is for kind azure, not {self.kind}")
            if self.api_version is not None and self.kind != "anthropic":
                raise ConfigError(f"{p}.api_version", f"is for kinds azure and anthropic, not {self.kind}")
        for key, value in (("api_version", self.api_version),):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{p}.{key}", f"must be a non-empty string, got {value!r}")
        if self.azure_ad_token_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*",
                                                                    str(self.azure_ad_token_env)):
            raise ConfigError(f"{p}.azure_ad_token_env",
                              f"must be an environment variable name, got {self.azure_ad_token_env!r}")
        if not isinstance(self.headers, Mapping):
            raise ConfigError(f"{p}.headers", f"must be a mapping of header names to values, got "
                                              f"{type(self.headers).__name__}")
        for name, value in self.headers.items():
            if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
                raise ConfigError(f"{p}.headers", f"bad header name {name!r}")
            if not isinstance(value, str) or "\n" in value or "\r" in value:
                raise ConfigError(f"{p}.headers.{name}", "must be a one-line string")
            if name.lower() in ("host", "content-length", "transfer-encoding", "connection"):
                raise ConfigError(f"{p}.headers.{name}", "is set by the gateway itself")

    def serves(self, endpoint: str) -> bool:
        """Whether this backend's kind can take ``endpoint`` at all (its server may still answer 404)."""
        return not (endpoint == "embeddings" and self.kind in NO_EMBEDDINGS_KINDS)

    @property
    def header_env(self) -> tuple[str, ...]:
        """The environment variables the headers name, in order."""
        return tuple(m.group(1) for v in self.headers.values() for m in _ENV_REF.finditer(v))

    def resolved_headers(self, env: Mapping[str, str]) -> dict[str, str]:
        """``headers`` with every ${NAME} replaced from ``env`` (start-up checks they are set)."""
        return {k: _ENV_REF.sub(lambda m: env.get(m.group(1), ""), v) for k, v in self.headers.items()}

    @property
    def version(self) -> str | None:
        """azure's api-version (the field or the url's), anthropic's anthropic-version header."""
        if self.kind == "azure":
            return self.api_version or parse_qs(urlparse(self.url).query)["api-version"][0]
        if self.kind == "anthropic":
            return self.api_version or ANTHROPIC_VERSION
        return None

    @property
    def base_url(self) -> str:
        """The url without its query (Azure's api-version travels as a parameter of each request)."""
        return self.url.split("?", 1)[0]

    @property
    def scrape_url(self) -> str | None:
        """Where ferry-style Prometheus metrics live; ``None`` for plain OpenAI-compatible backends."""
        if self.metrics_url is not None:
            return self.metrics_url
        if self.kind != "ferry":
            return None
        base = self.url.rstrip("/")
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        return base + "/metrics"


@dataclass(frozen=True)
class DeploymentConfig:
    """A public model served by one backend under its upstream name; prices may override the backend's."""

    backend: str
    model: str
    input_per_mtok: float | None = None
    output_per_mtok: float | None = None
    path: str = "deployments[?]"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"{self.path}.model", "must be a non-empty string")
        for name in ("input_per_mtok", "output_per_mtok"):
            if getattr(self, name) is not None:
                _non_negative(f"{self.path}.{name}", getattr(self, name))


@dataclass(frozen=True)
class ModelRoute:
    """A public model name clients ask for (one ``models[]`` entry), and the deployments that may serve it.

    NOTE: not ``ModelConfig``: that is the engine's (``ferry.config``), which says how to load weights.
    """

    name: str
    deployments: tuple[DeploymentConfig, ...]
    # NOTE: the three below size a request's reservation when no backend can count it exactly
    # (see reservation.py): the completion tokens a request without max_tokens may produce (the
    # model's context length self-hosted, the API's output cap in the cloud), and the tokens a chat
    # template adds per request (BOS, a default system prompt, the generation prompt) and per message.
    max_output_tokens: int = 32768
    template_overhead_tokens: int = 64
    message_overhead_tokens: int = 8
    path: str = "models[?]"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"{self.path}.name", "must be a non-empty string")
        if not self.deployments:
            raise ConfigError(f"{self.path}.deployments", "must list at least one deployment")
        for name, least in (("max_output_tokens", 1), ("template_overhead_tokens", 0),
                            ("message_overhead_tokens", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"{self.path}.{name}", f"must be an integer >= {least}, got {value!r}")


@dataclass(frozen=True)
class OverflowConfig:
    """When an on-prem deployment counts as saturated (any one threshold suffices)."""

    # in-flight requests at or above this fraction of max_concurrency
    inflight_fraction: float = 1.0
    # upstream `ferry:num_requests_waiting` at or above this (ferry backends); None disables
    max_waiting: int | None = 1
    # upstream `ferry:kv_cache_usage_perc` (0..1) at or above this; None disables
    max_kv_cache_usage: float | None = 0.95

    def __post_init__(self) -> None:
        if not isinstance(self.inflight_fraction, (int, float)) or not 0 < self.inflight_fraction <= 1:
            raise ConfigError("routing.overflow.inflight_fraction", f"must be in (0, 1], got {self.inflight_fraction!r}")
        if self.max_waiting is not None and (not isinstance(self.max_waiting, int) or self.max_waiting < 1):
            raise ConfigError("routing.overflow.max_waiting", f"must be a positive integer or null, got {self.max_waiting!r}")
        if self.max_kv_cache_usage is not None and (
                not isinstance(self.max_kv_cache_usage, (int, float)) or not 0 < self.max_kv_cache_usage <= 1):
            raise ConfigError("routing.overflow.max_kv_cache_usage",
                              f"must be in (0, 1] or null, got {self.max_kv_cache_usage!r}")


@dataclass(frozen=True)
class RoutingConfig:
    policy: str = "onprem-first"
    overflow: OverflowConfig = field(default_factory=OverflowConfig)
    retries: int = 2  # further attempts on other deployments after the first fails
    queue_timeout: float = 30.0  # seconds a request waits for an allowed deployment with room
    metrics_interval: float = 1.0  # seconds between scrapes of ferry backends' /metrics

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError("routing.policy", f"must be one of {POLICIES}, got {self.policy!r}")
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise ConfigError("routing.retries", f"must be a non-negative integer, got {self.retries!r}")
        _non_negative("routing.queue_timeout", self.queue_timeout)
        _positive("routing.metrics_interval", self.metrics_interval)


@dataclass(frozen=True)
class HealthConfig:
    interval: float = 5.0  # seconds between background health checks of each backend
    timeout: float = 2.0
    failure_threshold: int = 3  # consecutive failures that open the circuit
    cooldown: float = 10.0  # seconds an open circuit keeps a backend out before a health check may close it

    def __post_init__(self) -> None:
        _positive("health.interval", self.interval)
        _positive("health.timeout", self.timeout)
        _non_negative("health.cooldown", self.cooldown)
        if not isinstance(self.failure_threshold, int) or self.failure_threshold < 1:
            raise ConfigError("health.failure_threshold", f"must be a positive integer, got {self.failure_threshold!r}")


@dataclass(frozen=True)
class DataClassConfig:
    name: str
    locations: tuple[str, ...]

    def __post_init__(self) -> None:
        key = f"data_classes.{self.name}.locations"
        if not self.locations:
            raise ConfigError(key, "must list at least one location")
        for loc in self.locations:
            if loc not in LOCATIONS:
                raise ConfigError(key, f"unknown location {loc!r}, expected one of {LOCATIONS}")


@dataclass(frozen=True)
class PiiConfig:
    enabled: bool = True
    data_class: str = "restricted"  # the class a request carrying PII is tightened to
    detectors: tuple[str, ...] = PII_DETECTORS
    patterns: Mapping[str, str] = field(default_factory=dict)  # extra detectors: name -> regex

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError("pii.enabled", f"must be true or false, got {self.enabled!r}")
        for d in self.detectors:
            if d not in PII_DETECTORS:
                raise ConfigError("pii.detectors", f"unknown detector {d!r}, expected some of {PII_DETECTORS}")
        for name, pattern in self.patterns.items():
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ConfigError(f"pii.patterns.{name}", f"bad regular expression: {e}") from e


@dataclass(frozen=True)
class TeamConfig:
    name: str
    budget_usd: float | None = None

    def __post_init__(self) -> None:
        if self.budget_usd is not None:
            _non_negative(f"teams.{self.name}.budget_usd", self.budget_usd)


@dataclass(frozen=True)
class LedgerConfig:
    """How in-flight rows survive a gateway that dies (see recovery.py)."""

    progress_interval: float = 2.0  # seconds between writes of streams' delivered tokens and the heartbeat
    instance_lease: float = 30.0  # seconds without a heartbeat after which an instance counts as dead

    def __post_init__(self) -> None:
        _positive("ledger.progress_interval", self.progress_interval)
        _positive("ledger.instance_lease", self.instance_lease)
        if self.instance_lease < 2 * self.progress_interval:
            raise ConfigError("ledger.instance_lease", f"must be at least twice ledger.progress_interval "
                                                       f"({self.progress_interval:g}s), got {self.instance_lease!r}")


_DEFAULT_DATA_CLASSES = (
    DataClassConfig("public", ("onprem", "cloud")),
    DataClassConfig("restricted", ("onprem",)),
)


@dataclass(frozen=True)
class GatewayConfig:
    backends: tuple[BackendConfig, ...]
    models: tuple[ModelRoute, ...]
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    data_classes: tuple[DataClassConfig, ...] = _DEFAULT_DATA_CLASSES
    default_data_class: str = "public"
    pii: PiiConfig = field(default_factory=PiiConfig)
    database: str = "sqlite:///ferry-gateway.db"
    master_key_env: str = "FERRY_MASTER_KEY"
    health: HealthConfig = field(default_factory=HealthConfig)
    teams: tuple[TeamConfig, ...] = ()
    ledger: LedgerConfig = field(default_factory=LedgerConfig)

    def __post_init__(self) -> None:
        if not self.backends:
            raise ConfigError("backends", "must list at least one backend")
        if not self.models:
            raise ConfigError("models", "must list at least one model")
        seen: set[str] = set()
        for b in self.backends:
            if b.name in seen:
                raise ConfigError(f"{b.path}.name", f"duplicate backend name {b.name!r}")
            seen.add(b.name)
        names: set[str] = set()
        for m in self.models:
            if m.name in names:
                raise ConfigError(f"{m.path}.name", f"duplicate model name {m.name!r}")
            names.add(m.name)
            for d in m.deployments:
                if d.backend not in seen:
                    raise ConfigError(f"{d.path}.backend", f"unknown backend {d.backend!r}, "
                                                           f"expected one of {sorted(seen)}")
        classes = {c.name for c in self.data_classes}
        if self.default_data_class not in classes:
            raise ConfigError("default_data_class", f"unknown data class {self.default_data_class!r}, "
                                                    f"expected one of {sorted(classes)}")
        if self.pii.enabled and self.pii.data_class not in classes:
            raise ConfigError("pii.data_class", f"unknown data class {self.pii.data_class!r}, "
                                                f"expected one of {sorted(classes)}")
        if not re.fullmatch(r"(sqlite|postgresql)(\+\w+)?://.*", self.database):
            raise ConfigError("database", f"must be sqlite:///PATH or postgresql://…, got {self.database!r}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.master_key_env):
            raise ConfigError("master_key_env", f"must be an environment variable name, got {self.master_key_env!r}")

    def backend(self, name: str) -> BackendConfig:
        return next(b for b in self.backends if b.name == name)

    def model(self, name: str) -> ModelRoute | None:
        return next((m for m in self.models if m.name == name), None)

    def data_class(self, name: str) -> DataClassConfig | None:
        return next((c for c in self.data_classes if c.name == name), None)

    def team(self, name: str) -> TeamConfig | None:
        return next((t for t in self.teams if t.name == name), None)

    def missing_env(self, env: Mapping[str, str]) -> list[str]:
        """Messages for every secret the config names but ``env`` lacks (checked at start-up, not parse)."""
        errors = []
        if not env.get(self.master_key_env):
            errors.append(f"master_key_env: environment variable {self.master_key_env} is not set")
        for b in self.backends:
            if b.api_key_env is not None and not env.get(b.api_key_env):
                errors.append(f"{b.path}.api_key_env: environment variable {b.api_key_env} is not set")
            if b.azure_ad_token_env is not None and not env.get(b.azure_ad_token_env):
                errors.append(f"{b.path}.azure_ad_token_env: environment variable {b.azure_ad_token_env} "
                              "is not set")
            for name in b.header_env:
                if not env.get(name):
                    errors.append(f"{b.path}.headers: environment variable {name} is not set")
        return errors


# ---- parsing: plain YAML data -> dataclasses, rejecting unknown keys -------------------------------


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping, got {type(value).__name__}")
    return value


def _fields(data: dict[str, Any], key: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
            ) -> dict[str, Any]:
    for k in data:
        if k not in allowed:
            raise ConfigError(f"{key}.{k}" if key else str(k), f"unknown key, expected one of {list(allowed)}")
    for k in required:
        if k not in data:
            raise ConfigError(f"{key}.{k}" if key else k, "is required")
    return dict(data)


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(key, f"must be a list, got {type(value).__name__}")
    return value


_BACKEND_KEYS = ("name", "url", "location", "kind", "api_key_env", "max_concurrency", "timeout",
                 "connect_timeout", "input_per_mtok", "output_per_mtok", "metrics_url", "headers",
                 "api_version", "azure_ad_token_env")


_MODEL_LIMIT_KEYS = ("max_output_tokens", "template_overhead_tokens", "message_overhead_tokens")


def parse_config(data: Any) -> GatewayConfig:
    """Build a ``GatewayConfig`` from parsed YAML; raises ``ConfigError`` naming the key at fault."""
    top = _fields(_mapping(data, "config"), "", (
        "backends", "models", "routing", "data_classes", "default_data_class", "pii", "database",
        "master_key_env", "health", "teams", "ledger"), required=("backends", "models"))
    backends = []
    for i, raw in enumerate(_list(top.pop("backends"), "backends")):
        path = f"backends[{i}]"
        b = _fields(_mapping(raw, path), path, _BACKEND_KEYS, required=("name", "url"))
        backends.append(BackendConfig(**b, path=path))
    models = []
    for i, raw in enumerate(_list(top.pop("models"), "models")):
        path = f"models[{i}]"
        m = _fields(_mapping(raw, path), path, ("name", "deployments", *_MODEL_LIMIT_KEYS),
                    required=("name", "deployments"))
        deps = []
        for j, draw in enumerate(_list(m["deployments"], f"{path}.deployments")):
            dpath = f"{path}.deployments[{j}]"
            d = _fields(_mapping(draw, dpath), dpath, ("backend", "model", "input_per_mtok", "output_per_mtok"),
                        required=("backend", "model"))
            deps.append(DeploymentConfig(**d, path=dpath))
        models.append(ModelRoute(name=m["name"], deployments=tuple(deps), path=path,
                                 **{k: m[k] for k in _MODEL_LIMIT_KEYS if k in m}))
    kwargs: dict[str, Any] = {"backends": tuple(backends), "models": tuple(models)}
    if "routing" in top:
        r = _fields(_mapping(top.pop("routing"), "routing"), "routing",
                    ("policy", "overflow", "retries", "queue_timeout", "metrics_interval"))
        if "overflow" in r:
            r["overflow"] = OverflowConfig(**_fields(_mapping(r["overflow"], "routing.overflow"), "routing.overflow",
                                                     ("inflight_fraction", "max_waiting", "max_kv_cache_usage")))
        kwargs["routing"] = RoutingConfig(**r)
    if "health" in top:
        kwargs["health"] = HealthConfig(**_fields(_mapping(top.pop("health"), "health"), "health",
                                                  ("interval", "timeout", "failure_threshold", "cooldown")))
    if "ledger" in top:
        kwargs["ledger"] = LedgerConfig(**_fields(_mapping(top.pop("ledger"), "ledger"), "ledger",
                                                  ("progress_interval", "instance_lease")))
    if "data_classes" in top:
        classes = []
        for name, raw in _mapping(top.pop("data_classes"), "data_classes").items():
            c = _fields(_mapping(raw, f"data_classes.{name}"), f"data_classes.{name}", ("locations",),
                        required=("locations",))
            classes.append(DataClassConfig(str(name), tuple(_list(c["locations"], f"data_classes.{name}.locations"))))
        kwargs["data_classes"] = tuple(classes)
    if "pii" in top:
        p = _fields(_mapping(top.pop("pii"), "pii"), "pii", ("enabled", "data_class", "detectors", "patterns"))
        if "detectors" in p:
            p["detectors"] = tuple(_list(p["detectors"], "pii.detectors"))
        if "patterns" in p:
            p["patterns"] = dict(_mapping(p["patterns"], "pii.patterns"))
        kwargs["pii"] = PiiConfig(**p)
    if "teams" in top:
        teams = []
        for name, raw in _mapping(top.pop("teams"), "teams").items():
            t = _fields(_mapping(raw, f"teams.{name}"), f"teams.{name}", ("budget_usd",))
            teams.append(TeamConfig(str(name), **t))
        kwargs["teams"] = tuple(teams)
    for k in ("default_data_class", "database", "master_key_env"):
        if k in top:
            if not isinstance(top[k], str):
                raise ConfigError(k, f"must be a string, got {top[k]!r}")
            kwargs[k] = top.pop(k)
    try:
        return GatewayConfig(**kwargs)
    except TypeError as e:  # NOTE: a wrong value type reaching a dataclass, e.g. a list for a name
        raise ConfigError("config", str(e)) from e


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate a YAML config file."""
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(str(path), f"not valid YAML: {e}") from e
    return parse_config(data)


def describe(config: GatewayConfig) -> str:
    """What the gateway understood from a config, for `ferry gateway check`."""
    lines = ["backends:"]
    for b in config.backends:
        key = f", key from ${b.api_key_env}" if b.api_key_env else ""
        if b.azure_ad_token_env:
            key = f", Entra ID token from ${b.azure_ad_token_env}"
        if b.version:
            key += f", {'api-version' if b.kind == 'azure' else 'anthropic-version'} {b.version}"
        if b.headers:  # NOTE: names only: values may hold secrets
            key += f", headers {', '.join(sorted(b.headers))}"
        scrape = f", metrics {b.scrape_url}" if b.scrape_url else ""
        lines.append(f"  {b.name}: {b.kind} at {b.base_url} ({b.location}), max_concurrency {b.max_concurrency}, "
                     f"timeout {b.timeout:g}s, ${b.input_per_mtok:g}/${b.output_per_mtok:g} per Mtok in/out"
                     f"{key}{scrape}")
    lines.append("models:")
    for m in config.models:
        deps = ", ".join(f"{d.backend}/{d.model} ({config.backend(d.backend).location})" for d in m.deployments)
        lines.append(f"  {m.name} -> {deps}; without max_tokens reserves {m.max_output_tokens} completion tokens")
    r = config.routing
    o = r.overflow
    lines.append(f"routing: {r.policy}, {r.retries} retries, queue timeout {r.queue_timeout:g}s; on-prem saturated at "
                 f"in-flight >= {o.inflight_fraction:g} x max_concurrency"
                 f"{'' if o.max_waiting is None else f', waiting >= {o.max_waiting}'}"
                 f"{'' if o.max_kv_cache_usage is None else f', KV cache usage >= {o.max_kv_cache_usage:g}'}")
    lines.append("data classes: " + "; ".join(f"{c.name} -> {'+'.join(c.locations)}" for c in config.data_classes)
                 + f" (default {config.default_data_class})")
    if config.pii.enabled:
        detectors = list(config.pii.detectors) + list(config.pii.patterns)
        lines.append(f"pii: on ({', '.join(detectors)}) -> {config.pii.data_class}")
    else:
        lines.append("pii: off")
    h = config.health
    lines.append(f"health: every {h.interval:g}s, circuit opens after {h.failure_threshold} failures "
                 f"for {h.cooldown:g}s")
    for t in config.teams:
        lines.append(f"team {t.name}: budget " + ("none" if t.budget_usd is None else f"${t.budget_usd:g}"))
    lg = config.ledger
    lines.append(f"ledger: in-flight progress every {lg.progress_interval:g}s, an instance silent for "
                 f"{lg.instance_lease:g}s is settled as dead")
    lines.append(f"database: {config.database}")
    lines.append(f"master key from ${config.master_key_env}")
    return "\n".join(lines)
