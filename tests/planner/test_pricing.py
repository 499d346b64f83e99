"""Cost arithmetic by hand, and the costs file."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.planner.catalog import ApiPrice, get_gpu, resolve_model
from ferry.planner.errors import PlannerError
from ferry.planner.pricing import (CostAssumptions, api_monthly, cloud_on_demand_monthly, cloud_reserved_monthly,
                                   load_costs, onprem_monthly, per_mtok)

COSTS = CostAssumptions(hours_per_month=730, amortization_years=3, electricity_usd_per_kwh=0.12, pue=1.4,
                        host_capex_fraction=0.5, ops_usd_per_gpu_month=150, idle_power_fraction=0.3,
                        api_price=ApiPrice(0.5, 1.5))


def test_onprem_monthly_by_hand() -> None:
    h100 = get_gpu("h100-sxm")  # $30,000, 700 W
    c = onprem_monthly(4, h100, COSTS, utilization=0.5)
    assert c.capex == pytest.approx(4 * 30000 * 1.5 / 36)  # 5,000
    assert c.power == pytest.approx(4 * 0.7 * (0.3 + 0.7 * 0.5) * 1.4 * 730 * 0.12)  # 223.20
    assert c.ops == 600
    assert c.total == pytest.approx(5000 + 223.2048 + 600)
    assert onprem_monthly(0, h100, COSTS, 0.5).total == 0


def test_cloud_and_api_by_hand() -> None:
    h100 = get_gpu("h100-sxm")  # $2.99 on-demand, $2.20 reserved
    hourly = [1] * 12 + [3] * 12  # 2 GPUs on average
    assert cloud_on_demand_monthly(hourly, h100, COSTS) == pytest.approx(2 * 2.99 * 730)
    assert cloud_reserved_monthly(3, h100, COSTS) == pytest.approx(3 * 2.20 * 730)
    assert api_monthly(2e6, 1e6, ApiPrice(0.5, 1.5)) == pytest.approx(2 * 0.5 + 1.5)
    assert per_mtok(100.0, 50e6) == 2.0


def test_costs_file_overrides_defaults(tmp_path: Path) -> None:
    f = tmp_path / "costs.yaml"
    f.write_text("onprem: {pue: 1.1, amortization_years: 5}\napi: {output_usd_per_mtok: 9}\n"
                 "gpus: {h100-sxm: {purchase_usd: 20000}}\n")
    model = resolve_model("llama-3.1-8b")
    c = load_costs(model, f)
    assert (c.pue, c.amortization_years) == (1.1, 5)
    assert (c.api_price.input_usd_per_mtok, c.api_price.output_usd_per_mtok) == (0.18, 9)  # input from catalogue
    assert c.gpu(get_gpu("h100-sxm")).purchase_usd == 20000
    assert c.gpu(get_gpu("h100-sxm")).sources["purchase_usd"] == "--costs file"
    assert load_costs(model).pue == 1.4


def test_models_without_a_listed_price_use_the_size_tier() -> None:
    assert load_costs(resolve_model("smollm2-135m")).api_price.input_usd_per_mtok == 0.10
    assert load_costs(resolve_model("qwen2.5-32b")).api_price.input_usd_per_mtok == 0.80


@pytest.mark.parametrize("text,message", [
    ("onprem: {pue: 0.5}\n", "pue must be >= 1"),
    ("onprem: {watts: 3}\n", "unknown keys"),
    ("gpus: {b200: {purchase_usd: 1}}\n", "unknown GPU"),
    ("gpus: {h100-sxm: {memory_gib: 1}}\n", "unknown keys"),
    ("gpus: {h100-sxm: {purchase_usd: -1}}\n", "purchase_usd must be a positive number"),
    ("api: {input_usd_per_mtok: -1}\n", "must be a non-negative number"),
    ("hours_per_month: 0\n", "hours_per_month must be a positive number"),
    ("[1, 2]\n", "must be a mapping"),
])
def test_bad_costs_files(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(PlannerError, match=message):
        load_costs(resolve_model("llama-3.1-8b"), f)
