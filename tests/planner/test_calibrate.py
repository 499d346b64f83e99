"""Calibration: the fit's maths on synthetic measurements, the profile file, and the streaming client
against an in-process fake server (no network)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from ferry.planner.calibrate import (
    Measurement,
    Profile,
    SweepConfig,
    fit_efficiency,
    load_profile,
    measure,
    measurements_from_bench,
    predicted_vs_measured,
)
from ferry.planner.catalog import get_dtype, get_gpu, resolve_model
from ferry.planner.errors import PlannerError
from ferry.planner.throughput import Efficiency, Replica, serving_point

CPU = Replica(resolve_model("smollm2-135m"), get_gpu("cpu"), get_dtype("fp32"), get_dtype("fp32"))
H100 = Replica(resolve_model("llama-3.1-8b"), get_gpu("h100-sxm"), get_dtype("bf16"), get_dtype("bf16"))


def _measured(r: Replica, eff: Efficiency, c: int, prompt: int = 64, output: int = 32) -> Measurement:
    p = serving_point(r, c, prompt, output, eff)
    return Measurement(c, 8, prompt, output, p.ttft_s, p.itl_s, p.output_tok_s, 1.0)


@pytest.mark.parametrize("r,true,prompt,output", [
    (CPU, Efficiency(memory=0.05, compute=0.02, prefill=0.05, step_overhead_s=0.01), 64, 32),
    (CPU, Efficiency(memory=0.3, compute=0.1, prefill=0.2, step_overhead_s=0.0), 128, 64),
    (H100, Efficiency(memory=0.7, compute=0.4, prefill=0.5, step_overhead_s=0.002), 512, 128),
])
def test_fit_reproduces_measurements_and_predicts_unmeasured_concurrency(r: Replica, true: Efficiency, prompt: int,
                                                                         output: int) -> None:
    ms = [_measured(r, true, c, prompt, output) for c in (1, 4)]
    eff, rms = fit_efficiency(r, ms)
    assert rms < 0.03
    for c in (2, 3, 6):
        predicted = serving_point(r, c, prompt, output, eff).output_tok_s
        actual = serving_point(r, c, prompt, output, true).output_tok_s
        assert predicted == pytest.approx(actual, rel=0.1), c


def test_fit_interpolates_a_server_whose_step_time_is_linear_in_batch() -> None:
    # a server outside the model's family: ITL = 50 ms + 10 ms per running request
    def lin(c: int) -> Measurement:
        itl, ttft = 0.05 + 0.01 * c, 0.3 + 0.05 * (c - 1)
        return Measurement(c, 8, 64, 32, ttft, itl, c * 32 / (ttft + 31 * itl), 1.0)

    eff, _ = fit_efficiency(CPU, [lin(1), lin(8)])
    for c in (2, 4, 6):
        assert serving_point(CPU, c, 64, 32, eff).output_tok_s == pytest.approx(lin(c).output_tok_s, rel=0.1)


def test_fit_needs_measurements() -> None:
    with pytest.raises(PlannerError, match="at least one measurement"):
        fit_efficiency(CPU, [])
    with pytest.raises(PlannerError, match="itl_s must be positive"):
        Measurement(1, 1, 64, 32, 0.1, 0.0, 10.0, 1.0)


def test_profile_round_trip_and_errors(tmp_path: Path) -> None:
    eff = Efficiency(memory=0.1, compute=0.2, prefill=0.3, step_overhead_s=0.004)
    ms = (_measured(CPU, eff, 1), _measured(CPU, eff, 4))
    prof = Profile("smollm2-135m", "cpu", "fp32", "fp32", eff, 64, 32, ms, 0.01, "http://x", "now")
    path = tmp_path / "p.json"
    prof.save(path)
    assert load_profile(path) == prof
    rows = predicted_vs_measured(CPU, eff, ms, 64, 32)
    assert [r["predicted_tok_s"] for r in rows] == pytest.approx([r["measured_tok_s"] for r in rows])
    path.write_text(json.dumps({"version": 1, "model": "x"}))
    with pytest.raises(PlannerError, match="malformed"):
        load_profile(path)
    path.write_text("{")
    with pytest.raises(PlannerError, match="not valid JSON"):
        load_profile(path)


class FakeServer:
    """Streams ``max_tokens`` one-token chunks 2 ms apart, then usage and [DONE]; records bodies and peak load."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.bodies: list[dict] = []
        self.running = 0
        self.peak = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": "boom"}})

        async def stream():  # noqa: ANN202
            self.running += 1
            self.peak = max(self.peak, self.running)
            for i in range(body["max_tokens"]):
                await asyncio.sleep(0.002)
                yield f'data: {{"choices": [{{"index": 0, "text": "t{i}"}}]}}\n\n'.encode()
            usage = {"prompt_tokens": 70, "completion_tokens": body["max_tokens"], "total_tokens": 0}
            yield f'data: {{"choices": [], "usage": {json.dumps(usage)}}}\n\n'.encode()
            # NOTE: before the last chunk: the client stops reading at [DONE], leaving the generator suspended
            self.running -= 1
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, content=stream(), headers={"content-type": "text/event-stream"})


def test_sweep_against_a_fake_streaming_server() -> None:
    server = FakeServer()
    cfg = SweepConfig(url="http://fake:8000", concurrencies=(1, 3), requests_per_level=3, prompt_tokens=16,
                      output_tokens=5, timeout_s=30)
    doc = asyncio.run(measure(cfg, transport=httpx.MockTransport(server)))
    assert doc["schema"] == "ferry.bench/1" and {r["model"] for r in doc["records"]} == {"fake-model"}
    _, ms = measurements_from_bench(doc)
    assert [m.concurrency for m in ms] == [1, 3]
    assert [m.requests for m in ms] == [3, 3]
    assert all(m.prompt_tokens == 70 and m.output_tokens == 5 for m in ms)  # from the usage chunk
    assert all(m.itl_s > 0 and m.ttft_s > 0 and m.output_tok_s > 0 for m in ms)
    assert len(server.bodies) == 1 + 3 + 3  # warm-up + two levels
    assert server.peak == 3
    b = server.bodies[0]
    assert (b["model"], b["max_tokens"], b["stream"], b["ignore_eos"]) == ("fake-model", 5, True, True)
    # every request has its own prompt from the first words on: a prefix cache cannot skip prefills
    first_words = [tuple(body["prompt"].split()[:4]) for body in server.bodies]
    assert len(set(first_words)) == len(server.bodies)
    assert all(len(body["prompt"].split()) == 16 for body in server.bodies)


def test_sweep_reports_server_errors() -> None:
    cfg = SweepConfig(url="http://fake:8000/v1", concurrencies=(1,), requests_per_level=1, timeout_s=10)
    with pytest.raises(PlannerError, match="HTTP 500"):
        asyncio.run(measure(cfg, transport=httpx.MockTransport(FakeServer(status=500))))


def test_sweep_config_validation() -> None:
    with pytest.raises(PlannerError, match="http"):
        SweepConfig(url="localhost:8000")
    with pytest.raises(PlannerError, match="positive integers"):
        SweepConfig(url="http://x", concurrencies=(0,))
    assert SweepConfig(url="http://x/v1/").base == "http://x/v1"
    assert SweepConfig(url="http://x").requests_at(4) == 8
