"""The image's HEALTHCHECK: GET /health of the `ferry serve` or `ferry gateway` this container runs.

It reads the container's command line (PID 1, or the arguments given here) for the subcommand and
its ``--host``/``--port``/``--ssl-certfile`` (defaults: serve 8000, gateway 4000, as their flags),
so one image-level check fits every command. One-shot commands (``ferry plan``, ``ferry pull``)
serve nothing and count as healthy. Exit 0: healthy; 1: not (yet).

Standard library only: it runs every few seconds and must not pay for importing ferry or torch.
tests/deploy/test_dockerfile.py checks it reads command lines as ferry's own parsers do.
"""

from __future__ import annotations

import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_PORTS = {"serve": 8000, "gateway": 4000}
# `ferry gateway check|usage` answer and exit; only `gateway` / `gateway serve` serve HTTP
GATEWAY_ONE_SHOT = ("check", "usage")
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def container_argv() -> list[str]:
    """PID 1's arguments: the ENTRYPOINT's `ferry` (through its Python launcher) and the command."""
    raw = Path("/proc/1/cmdline").read_bytes()
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _flag(args: list[str], name: str) -> str | None:
    """The last value of ``--name VALUE`` or ``--name=VALUE``, as argparse keeps the last."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1:]
    return value


def health_url(argv: list[str]) -> str | None:
    """The /health URL of the server ``argv`` starts, or None when it starts no server."""
    # the subcommand is the first word after the `ferry` executable (or `-m ferry.cli`)
    words = list(argv)
    for i, word in enumerate(words):
        if word.endswith("/ferry") or word in ("ferry", "ferry.cli"):
            words = words[i + 1:]
            break
    if not words or words[0] not in DEFAULT_PORTS:
        return None
    command, rest = words[0], words[1:]
    if command == "gateway" and rest and rest[0] in GATEWAY_ONE_SHOT:
        return None
    port = int(_flag(rest, "--port") or DEFAULT_PORTS[command])
    host = _flag(rest, "--host") or "127.0.0.1"
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    scheme = "https" if command == "serve" and _flag(rest, "--ssl-certfile") else "http"
    return f"{scheme}://{host}:{port}/health"


def main(argv: list[str]) -> int:
    url = health_url(argv or container_argv())
    if url is None:
        return 0
    # NOTE: the certificate names the service, not 127.0.0.1; this checks liveness, not identity.
    context = ssl._create_unverified_context() if url.startswith("https") else None  # noqa: S323
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as response:  # noqa: S310
            ok = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
