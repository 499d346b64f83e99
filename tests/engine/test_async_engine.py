"""AsyncEngine: streams from the engine thread, abort on close, and a crash that fails loudly."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ferry.config import CacheConfig, EngineConfig, ModelConfig
from ferry.engine.async_engine import AsyncEngine, EngineDeadError
from ferry.sampling_params import SamplingParams


@pytest.fixture
def engine(tiny_llama_dir: Path) -> AsyncEngine:
    eng = AsyncEngine.from_config(EngineConfig(ModelConfig(str(tiny_llama_dir)),
                                               CacheConfig(kv_cache_memory=8 << 20)))
    eng.start()
    yield eng
    eng.shutdown()


async def _collect(engine: AsyncEngine, rid: str, prompt: str, params: SamplingParams) -> list:
    return [out async for out in engine.generate(prompt, params, rid)]


async def test_concurrent_streams_are_cumulative_and_end_finished(engine: AsyncEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    results = await asyncio.gather(*(_collect(engine, f"r{i}", f"prompt number {i}", params)
                                     for i in range(6)))
    for outs in results:
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        assert lengths == sorted(lengths) and lengths[-1] == 12
    while engine.stats().num_running:  # the snapshot is refreshed by the engine thread
        await asyncio.sleep(0.01)
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


async def test_closing_a_stream_aborts_and_frees_blocks(engine: AsyncEngine) -> None:
    stream = engine.generate("a long story", SamplingParams(max_tokens=400, ignore_eos=True), "x")
    await anext(stream)
    await stream.aclose()
    for _ in range(500):
        stats = engine.stats()
        if stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks:
            break
        await asyncio.sleep(0.01)
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks


async def test_bad_input_raises_before_streaming(engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="empty"):
        await anext(engine.generate("", SamplingParams(), "empty"))


async def test_a_crash_outside_the_model_step_fails_every_stream(
        engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_step() -> list:
        raise RuntimeError("boom in the scheduler")

    monkeypatch.setattr(engine.engine, "step", broken_step)
    with pytest.raises(EngineDeadError, match="boom"):
        await _collect(engine, "doomed", "hello", SamplingParams(max_tokens=4))
    for _ in range(100):
        if not engine.is_running:
            break
        await asyncio.sleep(0.01)
    assert not engine.is_running and "boom" in (engine.dead_reason or "")
    with pytest.raises(EngineDeadError):
        await anext(engine.generate("hello", SamplingParams(), "after"))
