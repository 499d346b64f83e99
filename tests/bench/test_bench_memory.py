"""Server memory for the benchmarks: /proc of real processes (a parent and the child it starts) and
Prometheus' process collector, as `ferry bench` and benchmarks/serving.py read them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from ferry.bench.memory import (
    MiB,
    metrics_url,
    parse_resident_memory,
    proc_memory,
    process_tree,
    scrape_memory,
)

# A parent holding HOLD MiB that starts a child which touches CHILD_PEAK MiB, frees most of it, keeps
# CHILD_HOLD MiB and then waits: the child's VmHWM stays above its VmRSS.
HOLD, CHILD_PEAK, CHILD_HOLD = 96, 160, 32
CHILD = (f"import time\nb = bytearray({CHILD_PEAK} * 2**20)\nb[::4096] = b'x' * len(b[::4096])\ndel b\n"
         f"k = bytearray({CHILD_HOLD} * 2**20)\nk[::4096] = b'y' * len(k[::4096])\n"
         "print('ready', flush=True)\ntime.sleep(600)\n")
PARENT = (f"import subprocess, sys, time\nb = bytearray({HOLD} * 2**20)\nb[::4096] = b'z' * len(b[::4096])\n"
          f"c = subprocess.Popen([sys.executable, '-c', {CHILD!r}], stdout=subprocess.PIPE, text=True)\n"
          "c.stdout.readline()\nprint(c.pid, flush=True)\ntime.sleep(600)\n")


@pytest.fixture()
def parent_and_child() -> Any:
    proc = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        child = int(proc.stdout.readline())  # type: ignore[union-attr]
        yield proc.pid, child
    finally:
        proc.kill()
        proc.wait(10)
        subprocess.run(["kill", "-9", str(child)], check=False)


def _vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} for {pid}")


def test_proc_memory_sums_the_process_and_its_children(parent_and_child: tuple[int, int]) -> None:
    parent, child = parent_and_child
    assert process_tree(parent) == [parent, child]
    m = proc_memory(parent)
    assert m is not None and m.source == "proc" and m.processes == 2
    assert m.rss_bytes == pytest.approx(_vm(parent, "VmRSS") + _vm(child, "VmRSS"), rel=0.02)
    assert m.rss_bytes >= (HOLD + CHILD_HOLD) * MiB
    # the child's peak (CHILD_PEAK MiB touched, then freed) counts in the peak, not in the RSS now
    assert m.peak_bytes is not None and m.peak_bytes >= (HOLD + CHILD_PEAK) * MiB
    assert m.peak_bytes - m.rss_bytes >= (CHILD_PEAK - CHILD_HOLD - 16) * MiB
    # the child alone
    alone = proc_memory(child)
    assert alone is not None and alone.processes == 1 and alone.rss_bytes < m.rss_bytes


def test_proc_memory_of_a_process_that_is_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    assert proc_memory(proc.pid) is None


def test_process_collector_page_parses_to_this_process_rss() -> None:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    text = generate_latest(registry).decode()
    rss = parse_resident_memory(text)
    assert rss is not None and rss == pytest.approx(_vm(os.getpid(), "VmRSS"), rel=0.1)
    # labelled series add up; other metrics that share the prefix do not count
    page = ('# HELP process_resident_memory_bytes x\nprocess_resident_memory_bytes{pid="1"} 1.0e+06\n'
            'process_resident_memory_bytes{pid="2"} 2e6\nprocess_resident_memory_bytes_total 7\n')
    assert parse_resident_memory(page) == 3_000_000
    assert parse_resident_memory("ferry:num_requests_running 0\n") is None


def test_metrics_url() -> None:
    assert metrics_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/metrics"
    assert metrics_url("http://h:1") == "http://h:1/metrics"


async def test_scrape_reads_a_server_with_metrics_and_not_one_without(naive_server: Any, fault_server: Any,
                                                                      unreachable_url: str) -> None:
    async with httpx.AsyncClient() as client:
        m = await scrape_memory(client, naive_server.url + "/v1")
        assert m is not None and m.source == "metrics" and m.peak_bytes is None
        # the naive server runs in this process (a thread): its RSS is this process's
        assert m.rss_bytes == pytest.approx(_vm(os.getpid(), "VmRSS"), rel=0.2)
        assert await scrape_memory(client, fault_server.url + "/v1") is None  # 404
        assert await scrape_memory(client, unreachable_url + "/v1") is None  # nothing listening
