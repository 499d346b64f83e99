"""A plan as a terminal table, a Markdown report, or JSON."""

from __future__ import annotations

import json

from ferry.planner.engines import Runtime
from ferry.planner.plan import Plan, TrafficPlan
from ferry.planner.text import plural


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB"


def _params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _ms(s: float) -> str:
    return f"{s * 1000:,.1f} ms"


def _headline(plan: Plan) -> list[str]:
    i, m = plan.inputs, plan.inputs.model
    moe = f", MoE: {_params(m.active_params)} active of {_params(m.total_params)}" if m.is_moe else ""
    lines = [f"{m.name} ({_params(m.total_params)} params{moe}) in {i.dtype.name}, KV {i.kv_dtype.name}, "
             f"context {i.context:,} on {i.gpu.name} ({i.gpu.description})"]
    if plan.load is None:
        lines.append("memory only: give --rps or --traffic for throughput, replicas and cost")
    else:
        t = plan.load.traffic
        lines.append(f"traffic: mean {t.mean_rps:.3g} req/s, peak {t.peak_rps:.3g} req/s, {t.prompt_tokens:,} "
                     f"prompt + {t.output_tokens:,} output tokens, {t.restricted_share:.0%} restricted to on-prem")
    return lines


def _memory_rows(plan: Plan) -> list[tuple[str, str]]:
    i, mem, m = plan.inputs, plan.memory, plan.inputs.model
    return [
        ("weights (whole model)", f"{_gb(mem.weight_bytes)}  ({_params(m.total_params)} x {i.dtype.bits:g} bits)"),
        ("KV bytes per token", f"{mem.kv_bytes_per_token:,.0f}  ({m.num_hidden_layers} layers x "
                               f"{m.num_key_value_heads} KV heads x {m.head_dim} x 2 x {i.kv_dtype.bytes:g} B)"),
        ("layout", f"{plural(mem.gpus, 'GPU')} per replica: tensor parallel {mem.tp} x pipeline {mem.pp}"),
        ("per GPU: weights", _gb(mem.per_gpu_weight_bytes)),
        ("per GPU: runtime overhead", _gb(mem.per_gpu_overhead_bytes)),
        ("per GPU: activations", _gb(mem.per_gpu_activation_bytes)),
        ("per GPU: KV pool", f"{_gb(mem.per_gpu_kv_bytes)} of {_gb(mem.per_gpu_usable_bytes)} usable"),
        ("KV tokens per replica", f"{mem.kv_tokens:,} ({mem.kv_tokens // mem.block_size:,} blocks of "
                                  f"{mem.block_size})"),
        ("sequences at full context", f"{mem.max_concurrent_seqs:,} of {mem.context:,} tokens"),
    ]


def _runtime_line(r: Runtime) -> str:
    who = "ferry runs it" if r.ferry_runs else "engines: " + (", ".join(r.engines) or "none")
    return (f"{r.note}: {plural(r.gpus, 'GPU')} per replica, {r.kv_tokens:,} KV tokens, "
            f"{plural(r.max_concurrent_seqs, 'sequence')} at full context ({who})")


def _engine_lines(plan: Plan) -> list[str]:
    a = plan.layout
    lines = [f"engines that run this layout: {', '.join(a.engines) or 'none of ferry, vLLM, SGLang, llama.cpp'}"]
    if a.ferry_runs:
        lines.append(f"run it: {a.planned.command}")
        return lines
    lines.append(f"ferry cannot: {a.ferry_why_not}")
    if not any(r.ferry_runs for r in a.alternatives):
        lines.append("nothing in the catalogue runs this model on one ferry device at this context")
    for n, r in enumerate(a.alternatives, 1):
        lines.append(f"alternative {n} ({r.kind}): {_runtime_line(r)}")
        lines.append(f"    run it: {r.command}")
        if r.kind == "backend":
            lines.append(f"    {r.engine}'s memory model: {r.memory_model}")
    return lines


def _throughput_rows(plan: Plan, load: TrafficPlan) -> list[tuple[str, str]]:
    i, s = plan.inputs, load.serving
    e = i.efficiency
    rows = [
        ("efficiency factors", f"memory {e.memory:.3g}, compute {e.compute:.3g}, prefill {e.prefill:.3g}, "
                               f"step overhead {_ms(e.step_overhead_s)} ({i.efficiency_source})"),
        ("batch meeting the SLOs", f"{s.batch} (KV and max_num_seqs allow {load.max_batch})"
                                   + ("" if load.slo_met else "  -- SLOs NOT met even at batch 1")),
        ("ITL / TTFT at that batch", f"{_ms(s.itl_s)} (SLO {_ms(i.slo_itl_s)}) / {_ms(s.ttft_s)} "
                                     f"(SLO {_ms(i.slo_ttft_s)})"),
        ("per replica", f"{s.output_tok_s:,.0f} output tok/s, {s.requests_s:.3g} req/s"),
        ("replicas", f"{load.replicas_mean} at mean, {load.replicas_peak} at peak "
                     f"({plural(load.replicas_peak * plan.gpus_per_replica, 'GPU')})"),
    ]
    if load.prediction is not None:
        p = load.prediction
        rows.append((f"predicted at concurrency {p.batch}", f"{p.output_tok_s:,.1f} output tok/s, ITL {_ms(p.itl_s)}, "
                                                          f"TTFT {_ms(p.ttft_s)}"))
    return rows


_OPTION_HEAD = ("option", "$/month", "$/Mtok", "fixed", "on-prem", "on-prem repl.", "allowed")


def _option_rows(load: TrafficPlan) -> list[tuple[str, ...]]:
    return [(o.name, f"{o.monthly_usd:,.0f}", f"{o.usd_per_mtok:.4f}", f"{o.fixed_share:.0%}",
             f"{o.onprem_share:.0%}", str(o.onprem_replicas), "yes" if o.allowed else "no: " + o.why_not)
            for o in load.options]


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(r[c])) for r in [head, *rows]) for c in range(len(head))]
    fmt = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(head), fmt(tuple("-" * w for w in widths)), *(fmt(r) for r in rows)]


def to_text(plan: Plan) -> str:
    head = _headline(plan)
    lines = ["ferry plan: " + head[0], "  " + head[1], "", "Memory"]
    lines += [f"  {k:<27} {v}" for k, v in _memory_rows(plan)]
    lines += ["", "Engines"] + [f"  {ln}" for ln in _engine_lines(plan)]
    load = plan.load
    if load is None:
        return "\n".join(lines) + "\n"
    lines += ["", "Throughput (roofline per replica)"]
    lines += [f"  {k:<27} {v}" for k, v in _throughput_rows(plan, load)]
    lines += ["", "Monthly cost"]
    lines += ["  " + r for r in _table(_OPTION_HEAD, _option_rows(load))]
    rec = load.recommendation
    lines += ["", f"Recommendation: {rec.option} (${rec.monthly_usd:,.0f}/month, ${rec.usd_per_mtok:.4f}/Mtok)"]
    lines += [f"  - {r}" for r in rec.reasons]
    lines += ["", f"Gateway config (on-prem ${load.onprem_input_per_mtok:.4f} in / "
                  f"${load.onprem_output_per_mtok:.4f} out per Mtok):"]
    lines += ["  " + ln for ln in load.gateway_config.rstrip().splitlines()]
    return "\n".join(lines) + "\n"


def to_markdown(plan: Plan) -> str:
    i = plan.inputs
    head = _headline(plan)
    out = [f"# ferry plan: {i.model.name} on {i.gpu.name}", "", f"**{head[0]}**", "", head[1].capitalize() + ".", ""]
    load = plan.load
    if load is not None:
        rec = load.recommendation
        out += ["## Recommendation", "", f"**{rec.option}** — ${rec.monthly_usd:,.0f}/month, "
                f"${rec.usd_per_mtok:.4f} per million tokens.", ""]
        out += [f"- {r}" for r in rec.reasons] + [""]
        out += ["## Monthly cost", "", "| " + " | ".join(_OPTION_HEAD) + " |",
                "|" + "|".join("---" for _ in _OPTION_HEAD) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in _option_rows(load)] + [""]
        a = i.costs
        out += [f"Assumptions: {a.amortization_years:g}-year amortization, host overhead {a.host_capex_fraction:.0%} "
                f"of GPU price, ${a.electricity_usd_per_kwh:g}/kWh at PUE {a.pue:g}, ops ${a.ops_usd_per_gpu_month:g} "
                f"per GPU-month, {a.hours_per_month:g} h/month; API ${a.api_price.input_usd_per_mtok:g} in / "
                f"${a.api_price.output_usd_per_mtok:g} out per Mtok ({a.api_price.source or 'catalogue'}).", ""]
        out += ["## Hybrid split", "", "| on-prem replicas | overflow to | $/month | on-prem share | hours covered "
                "| allowed |", "|---|---|---|---|---|---|"]
        out += [f"| {p.onprem_replicas} | {p.target} | {p.monthly_usd:,.0f} | {p.onprem_share:.0%} | "
                f"{p.covers_percentile:.0f}% | {'yes' if p.onprem_replicas >= load.k_min else 'no: restricted share'} |"
                for p in load.curve] + [""]
    out += ["## Memory", "", "| item | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in _memory_rows(plan)] + [""]
    out += ["## Engines", ""] + [f"- {ln.strip()}" for ln in _engine_lines(plan)] + [""]
    if load is not None:
        out += ["## Throughput", "", "| item | value |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in _throughput_rows(plan, load)] + [""]
        out += ["## Gateway config", "", "```yaml", load.gateway_config.rstrip(), "```", ""]
    out += ["## Sources", "", f"Model: {i.model.source or 'catalogue'}.", "", "| GPU value | source |", "|---|---|"]
    out += [f"| {k} = {getattr(i.costs.gpu(i.gpu), k)} | {v} |" for k, v in i.costs.gpu(i.gpu).sources.items()]
    out += ["", "Formulas: see docs/planner.md.", ""]
    return "\n".join(out)


def to_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2, allow_nan=False)
