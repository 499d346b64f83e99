"""Cost arithmetic, per month: on-prem (amortized capex, power, ops), cloud GPUs (on-demand following the
hourly profile, or reserved), and an API (per token).

On-prem, per GPU per month::

    capex  = purchase x (1 + host_capex_fraction) / (12 x amortization_years)
    power  = power_w / 1000 x (idle + (1 - idle) x utilization) x pue x hours_per_month x usd_per_kwh
    ops    = ops_usd_per_gpu_month

Cloud on-demand: sum over the 24 hours of (GPUs busy that hour) x usd_per_hour x hours_per_month / 24.
Cloud reserved: GPUs x reserved usd_per_hour x hours_per_month. API: Mtok in x input price + Mtok out x output price.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ferry.planner.catalog import ApiPrice, GpuSpec, ModelSpec, get_gpu, read_default_costs
from ferry.planner.errors import PlannerError

_ONPREM_KEYS = ("amortization_years", "electricity_usd_per_kwh", "pue", "host_capex_fraction",
                "ops_usd_per_gpu_month", "idle_power_fraction")


@dataclass(frozen=True)
class CostAssumptions:
    hours_per_month: float = 730.0
    amortization_years: float = 3.0
    electricity_usd_per_kwh: float = 0.12
    pue: float = 1.4
    host_capex_fraction: float = 0.5
    ops_usd_per_gpu_month: float = 150.0
    idle_power_fraction: float = 0.3
    api_price: ApiPrice = field(default_factory=lambda: ApiPrice(0.2, 0.2))
    gpu_overrides: dict[str, dict[str, float]] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("hours_per_month", "amortization_years", "pue"):
            _check(name, getattr(self, name), positive=True)
        for name in ("electricity_usd_per_kwh", "host_capex_fraction", "ops_usd_per_gpu_month"):
            _check(name, getattr(self, name), positive=False)
        _check("idle_power_fraction", self.idle_power_fraction, positive=False)
        if self.idle_power_fraction > 1:
            raise PlannerError(f"costs: idle_power_fraction must be in [0, 1], got {self.idle_power_fraction}")
        if self.pue < 1:
            raise PlannerError(f"costs: pue must be >= 1, got {self.pue}")

    def gpu(self, gpu: GpuSpec) -> GpuSpec:
        """The GPU with any price overrides from the costs file applied."""
        over = self.gpu_overrides.get(gpu.name)
        return gpu.with_prices(over) if over else gpu

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("api_price", "gpu_overrides")}
        d["api_price"] = asdict(self.api_price)
        return d


def default_api_price(model: ModelSpec, tiers: list[dict[str, float]], source: str) -> ApiPrice:
    """The catalogue's listed price for the model, else the size tier its parameter count falls in."""
    if model.api_price is not None:
        return model.api_price
    for tier in tiers:
        if model.total_params <= tier["max_params"]:
            return ApiPrice(tier["input_usd_per_mtok"], tier["output_usd_per_mtok"], source)
    last = tiers[-1]
    return ApiPrice(last["input_usd_per_mtok"], last["output_usd_per_mtok"], source)


def load_costs(model: ModelSpec, path: str | Path | None = None) -> CostAssumptions:
    """Defaults from ``data/costs.yaml`` overridden by a user ``--costs`` YAML file.

    The user file's layout: ``hours_per_month``, ``onprem: {amortization_years, ...}``,
    ``api: {input_usd_per_mtok, output_usd_per_mtok}``, ``gpus: {<name>: {purchase_usd, ...}}``.
    """
    d = read_default_costs()
    values: dict[str, Any] = {"hours_per_month": d["hours_per_month"]["value"]}
    values.update({k: d["onprem"][k]["value"] for k in _ONPREM_KEYS})
    tiers = d["api"]["tiers"]
    api = default_api_price(model, tiers["value"], tiers["source"])
    if path is None:
        return CostAssumptions(api_price=api, **values)
    try:
        user = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise PlannerError(f"cannot read costs file {str(path)!r}: {e}") from e
    except yaml.YAMLError as e:
        raise PlannerError(f"costs file {str(path)!r} is not valid YAML: {e}") from e
    if user is None:
        user = {}
    if not isinstance(user, dict):
        raise PlannerError(f"costs file {str(path)!r} must be a mapping")
    unknown = sorted(set(user) - {"hours_per_month", "onprem", "api", "gpus"})
    if unknown:
        raise PlannerError(f"costs file: unknown keys {unknown}, expected hours_per_month, onprem, api, gpus")
    if "hours_per_month" in user:
        values["hours_per_month"] = user["hours_per_month"]
    onprem = _section(user, "onprem")
    bad = sorted(set(onprem) - set(_ONPREM_KEYS))
    if bad:
        raise PlannerError(f"costs file: onprem: unknown keys {bad}, expected some of {list(_ONPREM_KEYS)}")
    values.update(onprem)
    api_user = _section(user, "api")
    bad = sorted(set(api_user) - {"input_usd_per_mtok", "output_usd_per_mtok"})
    if bad:
        raise PlannerError(f"costs file: api: unknown keys {bad}, expected input_usd_per_mtok, output_usd_per_mtok")
    if api_user:
        api = ApiPrice(api_user.get("input_usd_per_mtok", api.input_usd_per_mtok),
                       api_user.get("output_usd_per_mtok", api.output_usd_per_mtok), "--costs file")
    gpus = _section(user, "gpus")
    for name, over in gpus.items():
        if not isinstance(over, dict):
            raise PlannerError(f"costs file: gpus.{name} must be a mapping")
        get_gpu(str(name)).with_prices(over)  # NOTE: validates names and values now, not at first use
    return CostAssumptions(api_price=api, gpu_overrides={str(k).lower(): v for k, v in gpus.items()}, **values)


# ---- arithmetic ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnpremBreakdown:
    capex: float
    power: float
    ops: float

    @property
    def total(self) -> float:
        return self.capex + self.power + self.ops

    def __add__(self, other: OnpremBreakdown) -> OnpremBreakdown:
        return OnpremBreakdown(self.capex + other.capex, self.power + other.power, self.ops + other.ops)


def onprem_monthly(gpus: int, gpu: GpuSpec, costs: CostAssumptions, utilization: float) -> OnpremBreakdown:
    """Monthly cost of owning ``gpus`` GPUs that are busy ``utilization`` of the time on average."""
    if gpus < 0:
        raise PlannerError("GPU count must be >= 0")
    util = min(max(utilization, 0.0), 1.0)
    capex = gpu.purchase_usd * (1 + costs.host_capex_fraction) / (12 * costs.amortization_years)
    draw = costs.idle_power_fraction + (1 - costs.idle_power_fraction) * util
    power = gpu.power_w / 1000 * draw * costs.pue * costs.hours_per_month * costs.electricity_usd_per_kwh
    return OnpremBreakdown(gpus * capex, gpus * power, gpus * costs.ops_usd_per_gpu_month)


def cloud_on_demand_monthly(hourly_gpus: list[int] | tuple[int, ...], gpu: GpuSpec, costs: CostAssumptions) -> float:
    """GPUs rented per hour of the day, every day of the month, at on-demand prices."""
    return sum(hourly_gpus) * gpu.on_demand_usd_per_hour * costs.hours_per_month / len(hourly_gpus)


def cloud_reserved_monthly(gpus: int, gpu: GpuSpec, costs: CostAssumptions) -> float:
    return gpus * gpu.reserved_usd_per_hour * costs.hours_per_month


def api_monthly(input_tokens: float, output_tokens: float, price: ApiPrice) -> float:
    return input_tokens / 1e6 * price.input_usd_per_mtok + output_tokens / 1e6 * price.output_usd_per_mtok


def per_mtok(monthly_usd: float, monthly_tokens: float) -> float:
    return monthly_usd / (monthly_tokens / 1e6) if monthly_tokens > 0 else math.inf


def _section(user: dict[str, Any], key: str) -> dict[str, Any]:
    value = user.get(key) or {}
    if not isinstance(value, dict):
        raise PlannerError(f"costs file: {key} must be a mapping")
    return value


def _check(name: str, value: Any, *, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        kind = "a positive" if positive else "a non-negative"
        raise PlannerError(f"costs: {name} must be {kind} number, got {value!r}")


__all__ = ["CostAssumptions", "OnpremBreakdown", "api_monthly", "cloud_on_demand_monthly", "cloud_reserved_monthly",
           "default_api_price", "load_costs", "onprem_monthly", "per_mtok"]
