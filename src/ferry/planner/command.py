"""`ferry plan`: arguments, the plan or the calibration sweep, and the outputs (table, JSON, Markdown, PNGs).

Bad input never shows a traceback: every ``PlannerError`` becomes one ``ferry plan: error: ...`` line and
exit code 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ferry.planner.errors import PlannerError

if TYPE_CHECKING:
    from ferry.planner.calibrate import Profile
    from ferry.planner.catalog import DtypeSpec, GpuSpec, ModelSpec

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3,
          "gib": 1024**3, "ti": 1024**4, "tib": 1024**4}


def parse_size(text: str) -> int:
    """``"512MiB"`` -> 536870912; plain integers are bytes."""
    m = _SIZE.match(text)
    if not m:
        raise PlannerError(f"--kv-cache-memory: not a size: {text!r} (e.g. 536870912, 512MiB, 2GB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    m = parser.add_argument_group("model and hardware")
    m.add_argument("--model", help="catalogue name (e.g. llama-3.1-8b), HF config.json or folder, or a .gguf file")
    m.add_argument("--dtype", help="weights: fp32 bf16 fp16 fp8 int8 int4 q8_0 q6_k q5_k_m q4_k_m q4_1 q4_0 "
                                   "(default: bf16; fp32 on cpu; a GGUF's own format)")
    m.add_argument("--kv-dtype", help="KV cache: fp32 bf16 fp16 fp8 int8 (default: from --dtype)")
    m.add_argument("--context", type=int, help="max tokens per sequence (default: model max, capped at 8192)")
    m.add_argument("--gpu", help="h100-sxm h200 a100-80g a100-40g l40s l4 a10g mi300x rtx-4090 cpu "
                                 "(default: h100-sxm, or the profile's)")
    m.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    m.add_argument("--kv-cache-memory", help="fix the KV pool per GPU (bytes, or 512MiB, 2GB) as ferry serve does")
    m.add_argument("--block-size", type=int, default=16)
    m.add_argument("--max-num-seqs", type=int, default=256)
    m.add_argument("--max-num-batched-tokens", type=int, default=2048)
    t = parser.add_argument_group("traffic and SLOs")
    t.add_argument("--traffic", help="YAML: hourly_rps (24 values) or rps/peak_rps, prompt_tokens, output_tokens, "
                                     "restricted_share")
    t.add_argument("--rps", type=float, help="mean requests per second")
    t.add_argument("--peak-rps", type=float, help="peak-hour requests per second (default: --rps)")
    t.add_argument("--prompt-tokens", type=int, help="prompt tokens per request (default 512, or the profile's)")
    t.add_argument("--output-tokens", type=int, help="output tokens per request (default 256, or the profile's)")
    t.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    t.add_argument("--slo-itl-ms", type=float, default=100.0)
    t.add_argument("--restricted-share", type=float, help="share of requests that must stay on-prem (0..1)")
    t.add_argument("--concurrency", type=int, help="also predict closed-loop throughput at this concurrency")
    c = parser.add_argument_group("cost")
    c.add_argument("--costs", help="YAML overriding cost assumptions (see docs/planner.md)")
    c.add_argument("--onprem-percentile", type=float, default=50.0,
                   help="your hybrid: size on-prem to this percentile of hourly load (default 50)")
    c.add_argument("--predictability-weight", type=float, default=0.1,
                   help="extra cost share worth paying for fully fixed spend (default 0.1)")
    o = parser.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the plan as JSON")
    o.add_argument("--report", help="write a Markdown report to this file")
    o.add_argument("--plot", help="write PNGs: PATH-cost.png and PATH-load.png (PATH.png accepted)")
    o.add_argument("--emit", metavar="DIR", help="write the files that deploy the plan: cluster.yaml (ferry cluster "
                                                 "deploy), values.yaml (Helm), gateway.yaml, README.md")
    o.add_argument("--force", action="store_true", help="--emit into a folder that is not empty")
    o.add_argument("--replica-cpus", type=float,
                   help="--emit: CPUs per replica (default: 32 on --gpu cpu, the catalogue's socket; 4 per GPU)")
    k = parser.add_argument_group("calibration")
    k.add_argument("--calibrate", metavar="URL", help="measure a running OpenAI-compatible server and write a profile")
    k.add_argument("--calibrate-from", metavar="FILE",
                   help="fit the profile to a `ferry bench --out` file (closed-loop --concurrency levels, "
                        "--ignore-eos) instead of measuring a live server")
    k.add_argument("--bench-out", metavar="FILE",
                   help="--calibrate: also write what it measured as a `ferry bench --out` file")
    k.add_argument("--bench-label", help="--calibrate-from: the server's label when the file compares several")
    k.add_argument("--calibrate-concurrency", default="1,4", help="comma-separated concurrencies (default 1,4)")
    k.add_argument("--calibrate-requests", type=int, help="requests per level (default 2 x concurrency, >= 3)")
    k.add_argument("--calibrate-timeout", type=float, default=300.0, help="seconds for the whole sweep")
    k.add_argument("--served-model", help="model name to request (default: the first of GET /v1/models)")
    k.add_argument("--api-key", help="bearer token for the server under calibration")
    k.add_argument("--profile-out", default="ferry-profile.json", help="where --calibrate writes the profile")
    k.add_argument("--profile", help="plan with the efficiency factors of a calibration profile")


def run(args: argparse.Namespace) -> int:
    try:
        if args.calibrate and args.calibrate_from:
            raise PlannerError("give --calibrate URL or --calibrate-from FILE, not both")
        if args.emit and (args.calibrate or args.calibrate_from):
            raise PlannerError("--emit writes a plan's deployment: run it without --calibrate/--calibrate-from")
        if args.replica_cpus is not None and not args.replica_cpus > 0:
            raise PlannerError(f"--replica-cpus must be positive, got {args.replica_cpus}")
        return _calibrate(args) if args.calibrate or args.calibrate_from else _plan(args)
    except PlannerError as e:
        print(f"ferry plan: error: {e}", file=sys.stderr)
        return 2


def _resolve(args: argparse.Namespace, profile: Profile | None = None
             ) -> tuple[str, ModelSpec, GpuSpec, DtypeSpec, DtypeSpec]:
    """Model, GPU and formats from the arguments, falling back to the profile's, then to defaults."""
    from ferry.planner.catalog import get_dtype, get_gpu, resolve_model

    profile_gpu = profile.gpu if profile else None
    profile_dtype = profile.dtype if profile else None
    profile_kv = profile.kv_dtype if profile else None
    model_ref = args.model or (profile.model if profile else None)
    if not model_ref:
        raise PlannerError("--model is required (a catalogue name, config.json, folder or .gguf)")
    model = resolve_model(model_ref)
    gpu = get_gpu(args.gpu or profile_gpu or "h100-sxm")
    default_dtype = "fp32" if gpu.name == "cpu" else (model.file_type or "bf16")
    dtype = get_dtype(args.dtype or profile_dtype or default_dtype)
    if args.kv_dtype or profile_kv:
        kv = get_dtype(args.kv_dtype or profile_kv, for_kv=True)
    elif dtype.kv and dtype.name != "int8":
        kv = dtype
    else:
        kv = get_dtype("fp32" if gpu.name == "cpu" else "bf16", for_kv=True)
    return model_ref, model, gpu, dtype, kv


def _plan(args: argparse.Namespace) -> int:
    from ferry.planner.catalog import resolve_model
    from ferry.planner.plan import PlanInputs, make_plan
    from ferry.planner.pricing import load_costs
    from ferry.planner.report import to_json, to_markdown, to_text
    from ferry.planner.throughput import default_efficiency
    from ferry.planner.traffic import Traffic, load_traffic, make_traffic

    profile = None
    if args.profile:
        from ferry.planner.calibrate import load_profile

        profile = load_profile(args.profile)
    model_ref, model, gpu, dtype, kv = _resolve(args, profile)
    prompt = args.prompt_tokens or (profile.prompt_tokens if profile else 512)
    output = args.output_tokens or (profile.output_tokens if profile else 256)
    if args.restricted_share is not None and not 0 <= args.restricted_share <= 1:
        raise PlannerError(f"--restricted-share must be in [0, 1], got {args.restricted_share}")
    traffic: Traffic | None = None
    if args.traffic:
        traffic = load_traffic(args.traffic, restricted_share=args.restricted_share)
    elif args.rps is not None or args.peak_rps is not None:
        traffic = make_traffic(rps=args.rps, peak_rps=args.peak_rps, prompt_tokens=prompt, output_tokens=output,
                               restricted_share=args.restricted_share or 0.0)
    if traffic is None and (args.plot or args.concurrency):
        raise PlannerError(f"{'--plot' if args.plot else '--concurrency'} needs traffic: give --rps or --traffic")
    # NOTE: without traffic the plan answers the memory question only: no throughput, replicas or cost.
    need = traffic.prompt_tokens + traffic.output_tokens if traffic else 0
    context = args.context or min(model.max_position_embeddings, max(8192, need))
    if profile is not None:
        efficiency = profile.efficiency
        source = f"calibrated: {args.profile}"
        if (profile.gpu, profile.dtype) != (gpu.name, dtype.name) or resolve_model(profile.model) != model:
            source += (f" (measured for {profile.model} in {profile.dtype} on {profile.gpu}; applied to "
                       f"{model.name} in {dtype.name} on {gpu.name})")
    else:
        efficiency, source = default_efficiency(gpu), "default factors"
    inputs = PlanInputs(
        model=model, gpu=gpu, dtype=dtype, kv_dtype=kv, context=context, traffic=traffic,
        costs=load_costs(model, args.costs), efficiency=efficiency, efficiency_source=source,
        slo_ttft_s=args.slo_ttft_ms / 1000, slo_itl_s=args.slo_itl_ms / 1000, onprem_percentile=args.onprem_percentile,
        predictability_weight=args.predictability_weight, memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory=parse_size(args.kv_cache_memory) if args.kv_cache_memory else None,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, concurrency=args.concurrency)
    plan = make_plan(inputs)
    emitted: list[Path] = []
    if args.emit:
        from ferry.planner.emit import EmitSettings, serve_model_ref, write

        # NOTE: written before the report is printed: a folder that refuses the files fails the command
        # without a plan on stdout that looks like success
        settings = EmitSettings(serve_model=serve_model_ref(model_ref, model), replica_cpus=args.replica_cpus,
                                force=args.force)
        emitted = write(plan, args.emit, settings)
    print(to_json(plan) if args.json else to_text(plan), end="" if not args.json else "\n")
    if args.report:
        _write(args.report, to_markdown(plan))
        print(f"wrote {args.report}", file=sys.stderr)
    if args.plot:
        from ferry.planner.plot import write_plots

        for path in write_plots(plan, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    if args.emit:
        for path in emitted:
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import json

    from ferry.planner.calibrate import (
        SweepConfig,
        calibrate,
        measurements_from_bench,
        profile_from_measurements,
        read_bench,
    )
    from ferry.planner.memory import plan_memory
    from ferry.planner.throughput import Replica

    model_ref, model, gpu, dtype, kv = _resolve(args)
    context = args.context or min(model.max_position_embeddings, 8192)
    mem = plan_memory(model, gpu, dtype, kv, context, memory_utilization=args.gpu_memory_utilization,
                      kv_cache_memory=parse_size(args.kv_cache_memory) if args.kv_cache_memory else None,
                      block_size=args.block_size)
    replica = Replica.from_memory(model, gpu, dtype, kv, mem)
    if args.calibrate_from:
        label, ms = measurements_from_bench(read_bench(args.calibrate_from), args.bench_label)
        source = f"{args.calibrate_from} ({label})"
        profile, rows = profile_from_measurements(replica, model_ref, ms, source)
    else:
        try:
            levels = tuple(int(x) for x in args.calibrate_concurrency.split(",") if x.strip())
        except ValueError as e:
            raise PlannerError(f"--calibrate-concurrency must be integers like 1,4: "
                               f"{args.calibrate_concurrency!r}") from e
        cfg = SweepConfig(url=args.calibrate, concurrencies=levels, requests_per_level=args.calibrate_requests,
                          prompt_tokens=args.prompt_tokens or 64, output_tokens=args.output_tokens or 32,
                          timeout_s=args.calibrate_timeout, api_key=args.api_key, model=args.served_model)
        source = args.calibrate
        profile, rows, doc = calibrate(cfg, replica, model_ref)
        if args.bench_out:
            _write(args.bench_out, json.dumps(doc, indent=2) + "\n")
    _write(args.profile_out, json.dumps(profile.to_dict(), indent=2) + "\n")
    if args.json:
        print(json.dumps({"profile": profile.to_dict(), "profile_path": args.profile_out, "levels": rows}, indent=2))
    else:
        e = profile.efficiency
        print(f"calibrated {model.name} ({dtype.name}) on {gpu.name} against {source}")
        print(f"  efficiency: memory {e.memory:.4g}, compute {e.compute:.4g}, prefill {e.prefill:.4g}, "
              f"step overhead {e.step_overhead_s * 1000:.2f} ms (rms log error {profile.fit_rms_log_error:.3f})")
        print("  concurrency  measured tok/s  predicted tok/s  ITL ms meas/pred  TTFT ms meas/pred")
        for r in rows:
            print(f"  {r['concurrency']:>11}  {r['measured_tok_s']:>14.1f}  {r['predicted_tok_s']:>15.1f}  "
                  f"{r['measured_itl_ms']:>7.1f}/{r['predicted_itl_ms']:<7.1f}  "
                  f"{r['measured_ttft_ms']:>7.1f}/{r['predicted_ttft_ms']:<7.1f}")
        print(f"wrote {args.profile_out}; plan with: ferry plan --profile {args.profile_out} ...")
    return 0


def _write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise PlannerError(f"cannot write {path!r}: {e}") from e
