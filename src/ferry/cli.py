"""`ferry serve | gateway | plan | bench | models | pull | rm | generate | chat`; `ferry --version`.

Each subcommand lives in a module exposing ``add_arguments(parser, command)`` and ``run(args) -> int``
(``args.command`` names the subcommand);
modules are imported only when their subcommand runs, so `ferry plan` never pays for torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ferry.version import __version__

# subcommand -> (module, one-line help)
_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("ferry.server.command", "serve a model over an OpenAI-compatible HTTP API"),
    "gateway": ("ferry.gateway.command", "one OpenAI endpoint over on-prem replicas and cloud APIs"),
    "plan": ("ferry.planner.command", "VRAM, throughput and cost for on-prem, cloud, API and hybrid"),
    "bench": ("ferry.bench.command", "load-test OpenAI-compatible endpoints"),
    "cluster": ("ferry.cluster.command", "deploy, inspect and stop ferry replicas on Ray Serve"),
    "models": ("ferry.engine.commands", "list the built-in models and the Hub models in the cache"),
    "pull": ("ferry.engine.commands", "download a Hugging Face Hub model (org/name or org/name:QUANT)"),
    "rm": ("ferry.engine.commands", "remove a cached Hub model, or one quant of it (org/name:QUANT)"),
    "generate": ("ferry.engine.commands", "generate text offline from a prompt"),
    "chat": ("ferry.engine.commands", "chat interactively with a model, streaming tokens"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry", description="Ferry: an LLM serving stack.")
    parser.add_argument("--version", action="version", version=f"ferry {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in _COMMANDS else None
    for name, (module_name, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            importlib.import_module(module_name).add_arguments(p, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module_name = _COMMANDS[args.command][0]
    if args.command == "serve" and getattr(args, "replicas", None) is not None:
        module_name = "ferry.cluster.command"  # NOTE: `ferry serve --replicas N` runs on Ray Serve
    module = importlib.import_module(module_name)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
