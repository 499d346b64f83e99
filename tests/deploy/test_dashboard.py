"""deploy/grafana/ferry-dashboard.json: it loads, has vLLM's reference panels and the gateway's, and every
PromQL expression names only series that a running `ferry serve` or `ferry gateway` exports."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

# PromQL words that are not metric names: aggregations, functions, keywords
_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "le", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, ranges, strings and by-clauses dropped)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)              # strings
    text = re.sub(r"\{[^}]*\}", "", text)                      # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                     # ranges and subqueries
    text = re.sub(r"(?<![A-Za-z0-9_:])\d+(\.\d+)?(ms|[smhdwy])?(?![A-Za-z0-9_:])", "", text)  # numbers, durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        following = text[m.end():].lstrip()
        if following.startswith("(") or word.lower() in _NOT_METRICS:
            continue  # a function call or a keyword
        if text[:m.start()].endswith("$"):
            continue  # a Grafana variable
        names.add(word)
    return names


def test_metric_names_reads_promql() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, backend) (rate(ferry_gateway:request_latency_seconds_bucket'
            '{backend=~"$backend", x="a{b}"}[$__rate_interval]))) / on (instance) group_left sum(up offset 5m)'
            ' + max_over_time(ferry:num_requests_waiting[5m:1m])')
    assert metric_names(expr) == {"ferry_gateway:request_latency_seconds_bucket", "up",
                                  "ferry:num_requests_waiting"}


def _expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"]["query"])
            assert m, var["query"]
            out.append((f"variable {var['name']}", m.group(1)))
    return out


def test_dashboard_is_well_formed(dashboard) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert t["datasource"] == panel["datasource"]
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24


def test_dashboard_has_the_reference_panels(dashboard) -> None:
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for wanted in ("e2e request latency", "time to first token", "inter-token latency", "time per output token",
                   "token throughput", "scheduler state", "kv cache usage", "prefix cache hit rate",
                   "finish reasons", "queue time", "prefill and decode time",
                   # the gateway's
                   "requests by backend", "spend by backend", "overflow share", "data-class decisions",
                   "rejections by reason", "circuit state"):
        assert wanted in titles, wanted


def test_every_expression_reads_ferry_series(dashboard) -> None:
    for where, expr in _expressions(dashboard):
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr}"
        for name in names:
            assert name.startswith(("ferry:", "ferry_gateway:")), f"{where}: {name} is not one of ferry's"


def _exported(text: str) -> set[str]:
    """Every series name a /metrics page can hold, from its # TYPE lines (a histogram with no
    observation yet still has one) and its samples."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            if kind == "counter":
                base = family.removesuffix("_total")
                names |= {base + "_total", base + "_created"}
            elif kind in ("histogram", "gaugehistogram"):
                names |= {family + s for s in ("_bucket", "_sum", "_count", "_created")}
            elif kind == "summary":
                names |= {family, family + "_sum", family + "_count", family + "_created"}
            else:
                names.add(family)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def _base(name: str) -> str:
    return re.sub(r"_(bucket|sum|count|total|created)$", "", name)


@pytest.mark.slow
def test_every_dashboard_metric_is_exported_by_a_running_ferry(dashboard, tmp_path: Path, smollm2_path,
                                                                 healthcheck, root: Path) -> None:
    from ferry_server import ServerProcess
    from gateway.conftest import MASTER
    from gateway.gateway_process import GatewayProcess

    with ServerProcess("smollm2-135m-instruct", tmp_path / "serve.log", "--max-model-len", "512",
                       "--kv-cache-memory", "64MiB") as server:
        # the compose stack's gateway config, pointed at this replica and an SQLite ledger
        config = yaml.safe_load((root / "deploy" / "compose" / "gateway.yaml").read_text())
        for b in config["backends"]:
            b["url"] = server.base_url + "/v1"
        config["database"] = f"sqlite:///{tmp_path}/ledger.db"
        config["health"]["interval"] = 0.5
        gateway = GatewayProcess(config, tmp_path, "deploy-test").start()
        try:
            r = httpx.post(gateway.url + "/v1/chat/completions", timeout=120,
                           headers={"Authorization": f"Bearer {MASTER}"},
                           json={"model": "smollm2-135m-instruct", "max_tokens": 4,
                                 "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 200, r.text
            # the image's HEALTHCHECK finds both from their command lines
            assert healthcheck.main(["ferry", "serve", "--port", str(server.port)]) == 0
            assert healthcheck.main(["ferry", "gateway", "serve", "--port", str(gateway.port)]) == 0
            exported = _exported(httpx.get(server.base_url + "/metrics", timeout=10).text)
            exported |= _exported(httpx.get(gateway.url + "/metrics", timeout=10).text)
        finally:
            gateway.stop()
    missing: dict[str, list[str]] = {}
    for where, expr in _expressions(dashboard):
        for name in metric_names(expr) - exported:
            missing.setdefault(name, []).append(where)
    exported_bases = {_base(n) for n in exported}
    missing_bases = sorted({_base(n) for n in missing} - exported_bases)
    assert not missing, (f"the dashboard reads series no running ferry exports; missing metrics: {missing_bases}; "
                         f"details: {missing}")


def test_exported_names_come_from_type_lines_and_samples() -> None:
    page = ("# HELP ferry:ttft_seconds x\n# TYPE ferry:ttft_seconds histogram\n"
            "# HELP ferry:tokens_total x\n# TYPE ferry:tokens_total counter\n"
            'ferry:tokens_total{model_name="m"} 3.0\n'
            "# TYPE ferry:num_requests_waiting gauge\n")
    names = _exported(page)
    assert names == {"ferry:ttft_seconds_bucket", "ferry:ttft_seconds_sum", "ferry:ttft_seconds_count",
                     "ferry:ttft_seconds_created", "ferry:tokens_total", "ferry:tokens_created",
                     "ferry:num_requests_waiting"}
    assert metric_names("rate(ferry:time_per_output_token_seconds_bucket[1m])") - names == {
        "ferry:time_per_output_token_seconds_bucket"}
