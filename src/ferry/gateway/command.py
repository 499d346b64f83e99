"""`ferry gateway --config F` serves; `ferry gateway check F` validates; `ferry gateway usage` reports."""

from __future__ import annotations

import argparse
import os
import sys

from ferry.gateway.config import ConfigError, describe, load_config


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("action", nargs="?", choices=("serve", "check", "usage"), default="serve",
                        help="serve (default), check a config, or print usage from the ledger")
    parser.add_argument("file", nargs="?", help="the config file (same as --config)")
    parser.add_argument("--config", help="gateway YAML config")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4000)
    parser.add_argument("--group-by", default="key", help="usage: key|team|backend|location|model|data_class|status")
    parser.add_argument("--since", default=None, help="usage: unix seconds or an ISO-8601 time")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.add_argument("--log-format", default="text", choices=("text", "json"),
                        help="text lines, or one JSON object per line (ts, level, logger, msg), as `ferry serve`")
    parser.add_argument("--log-stats-interval", type=_seconds, default=10.0, metavar="SECONDS",
                        help="seconds between the one-line summaries (requests, overflow share, spend) in "
                             "the log; 0: none (default: %(default)s)")
    parser.add_argument("--instance", default=os.environ.get("FERRY_GATEWAY_INSTANCE"),
                        help="this instance's name in the ledger (default: $FERRY_GATEWAY_INSTANCE, else random); "
                             "a restart under the same name settles the requests the last run left in flight. "
                             "Two running instances must never share one")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds >= 0: {text!r}")
    return value


def _config_path(args: argparse.Namespace) -> str | None:
    if args.file and args.config and args.file != args.config:
        print("error: give the config once, as FILE or --config", file=sys.stderr)
        return None
    path = args.file or args.config
    if path is None:
        print("error: a config file is required (--config FILE)", file=sys.stderr)
    return path


def run(args: argparse.Namespace) -> int:
    path = _config_path(args)
    if path is None:
        return 2
    try:
        config = load_config(path)
    except FileNotFoundError:
        print(f"error: {path}: no such file", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        # NOTE: a database URL no driver could take is the same failure as one that does not answer (2)
        return 2 if e.key == "database" and args.action != "check" else 1
    missing = config.missing_env(os.environ)
    if args.action == "check":
        print(describe(config))
        for m in missing:
            print(f"error: {m}", file=sys.stderr)
        if not missing:
            print(f"{path}: OK")
        return 1 if missing else 0
    if args.action == "usage":
        # NOTE: imported here, as the app below is: `check` must answer without loading SQLAlchemy,
        # and neither `check` nor `usage` should pay for FastAPI and uvicorn (about 10x the start-up).
        from ferry.gateway.db import DatabaseError, make_engine
        from ferry.gateway.ledger import GROUP_BY, Ledger, format_usage, parse_since

        if args.group_by not in GROUP_BY:
            print(f"error: --group-by must be one of {', '.join(GROUP_BY)}", file=sys.stderr)
            return 2
        try:
            since = parse_since(args.since)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            engine = make_engine(config.database)
        except DatabaseError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            print(format_usage(args.group_by, Ledger(engine, "cli").usage(args.group_by, since)))
        finally:
            engine.dispose()
        return 0
    if missing:
        for m in missing:
            print(f"error: {m}", file=sys.stderr)
        return 1
    import uvicorn

    from ferry.gateway.app import create_app
    from ferry.gateway.db import DatabaseError
    from ferry.logformat import configure_logging

    # NOTE: uvicorn's access log is the gateway's request log: kept, probes moved to DEBUG
    configure_logging(args.log_level, args.log_format, uvicorn_access=True)

    if args.instance is not None and not 1 <= len(args.instance) <= 64:
        print("error: --instance must be 1 to 64 characters", file=sys.stderr)
        return 2
    try:
        app = create_app(config, instance=args.instance)
    except DatabaseError as e:
        # NOTE: one line, no traceback: what an operator (or a crash-looping pod's log) needs is which
        # database and why.
        print(f"error: {e}", file=sys.stderr)
        return 2
    app.state.gateway.log_stats_interval = args.log_stats_interval
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None, access_log=True)
    return 0
