"""The deployment kit's files, parsed, and ferry's own argument parsers to check them against.

Fixtures rather than a helper module: ``deploy`` is also the repository's folder of deployment
files, so a ``tests/deploy`` package name would be ambiguous on ``sys.path``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from ferry.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def parse_ferry(argv: list[str]) -> argparse.Namespace:
    """``argv`` (after ``ferry``) as ferry's CLI parses it; a flag it does not know fails the test."""
    parser = build_parser(argv)
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"ferry rejects the command line {shlex.join(argv)!r}") from exc


def ferry_default(command: str, dest: str) -> Any:
    """The default of one flag of a ferry subcommand, read from its parser."""
    return getattr(parse_ferry([command]), dest)


def interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}`` with nothing set: each variable takes its default."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", text)


class Dockerfile:
    """The root Dockerfile's instructions (continuations joined), by keyword."""

    def __init__(self, path: Path) -> None:
        self.path = path
        text = re.sub(r"\\\n", " ", path.read_text())
        self.instructions: list[tuple[str, str]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            keyword, _, rest = line.partition(" ")
            self.instructions.append((keyword.upper(), rest.strip()))

    def all(self, keyword: str) -> list[str]:
        return [rest for k, rest in self.instructions if k == keyword]

    def stage(self, name: str) -> list[tuple[str, str]]:
        """The instructions of the stage ``FROM ... AS name``."""
        out: list[tuple[str, str]] = []
        inside = False
        for keyword, rest in self.instructions:
            if keyword == "FROM":
                inside = rest.lower().endswith(f" as {name}")
                continue
            if inside:
                out.append((keyword, rest))
        return out

    def env(self, stage: str) -> dict[str, str]:
        env: dict[str, str] = {}
        for keyword, rest in self.stage(stage):
            if keyword == "ENV":
                for token in shlex.split(rest):
                    key, _, value = token.partition("=")
                    env[key] = value
        return env

    def exec_form(self, keyword: str, stage: str = "runtime") -> list[str]:
        found = [rest for k, rest in self.stage(stage) if k == keyword]
        assert len(found) == 1, f"one {keyword} in the {stage} stage, found {found}"
        value = json.loads(found[0].split("CMD ", 1)[-1] if keyword == "HEALTHCHECK" else found[0])
        assert isinstance(value, list), f"{keyword} must be in exec form (a JSON list): {found[0]}"
        return value


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def ferry_args() -> Callable[[list[str]], argparse.Namespace]:
    return parse_ferry


@pytest.fixture(scope="session")
def dockerfile() -> Dockerfile:
    return Dockerfile(ROOT / "Dockerfile")


@pytest.fixture(scope="session")
def healthcheck() -> ModuleType:
    return _load_module(ROOT / "deploy" / "docker" / "healthcheck.py", "ferry_deploy_healthcheck")


@pytest.fixture(scope="session")
def chart_render() -> ModuleType:
    return _load_module(ROOT / "deploy" / "helm" / "render.py", "ferry_deploy_render")


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return yaml.safe_load(interpolate((ROOT / "deploy" / "compose" / "compose.yaml").read_text()))


@pytest.fixture(scope="session")
def manifests() -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "ferry.yaml").read_text()) if d]
    assert docs, "deploy/kubernetes/ferry.yaml holds no manifest"
    return docs


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    return json.loads((ROOT / "deploy" / "grafana" / "ferry-dashboard.json").read_text())
