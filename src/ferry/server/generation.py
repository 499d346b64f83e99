"""One HTTP request's generation: admission, engine streams, metrics, disconnects, errors.

Routes turn a validated body into a ``Generation`` (token-id prompts + ``SamplingParams``); this
module runs it against the engine and hands back cumulative ``RequestOutput``s tagged with their
prompt index. It is the only place that talks to ``engine.generate``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from ferry.batch.request import child_request_id
from ferry.engine.async_engine import AsyncEngine, EngineDeadError, EngineStoppedError
from ferry.openai_errors import OpenAIError, bad_request
from ferry.outputs import RequestOutput
from ferry.sampling_params import SamplingParams
from ferry.server.admission import AdmissionRejected, RequestTooLarge
from ferry.server.logging import RequestLogInfo, log_info_of
from ferry.server.metrics import RequestRecorder
from ferry.server.state import ServerState
from ferry.server.stream_merge import merge_streams

logger = logging.getLogger(__name__)

T = TypeVar("T")


def engine_error(exc: Exception, request_id: str) -> OpenAIError:
    """Map an exception raised by ``engine.generate`` to the HTTP error the client sees."""
    if isinstance(exc, ValueError):
        # NOTE: a grammar that does not compile (ferry.structured.GrammarError) names its field
        return bad_request(str(exc), param=getattr(exc, "param", None))
    if isinstance(exc, EngineStoppedError):
        # NOTE: the server ended it while shutting down (the drain deadline, a second signal): the
        # same 503 code new requests get meanwhile.
        return OpenAIError(503, str(exc), code="server_shutting_down")
    if isinstance(exc, EngineDeadError):
        return OpenAIError(503, f"The engine is not running: {exc}", code="engine_dead")
    logger.error("engine failed request %s", request_id, exc_info=exc)
    return OpenAIError(500, f"The engine failed this request: {type(exc).__name__}: {exc}",
                       code="engine_error")


@dataclass
class Generation:
    state: ServerState
    engine: AsyncEngine
    request_id: str
    prompts: list[list[int]]
    params: SamplingParams
    units: int = 0
    recorders: list[RequestRecorder] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    _stream: AsyncIterator[tuple[int, RequestOutput]] | None = None
    _closed: bool = False

    @property
    def sub_ids(self) -> list[str]:
        if len(self.prompts) == 1:
            return [self.request_id]
        return [child_request_id(self.request_id, i) for i in range(len(self.prompts))]

    def admit(self) -> None:
        """Take ``prompts x n`` sequences from admission control (429/400 when it says no)."""
        units = len(self.prompts) * self.params.n
        try:
            self.state.admission.try_acquire(units)
        except RequestTooLarge as exc:
            raise bad_request(str(exc), param="n") from exc
        except AdmissionRejected as exc:
            metrics = self.state.metrics
            if metrics is not None:
                metrics.admission_rejections.labels(metrics.model_name).inc()
            raise OpenAIError(429, f"The server is overloaded ({exc}); retry later.",
                              code="server_overloaded", headers={"Retry-After": "1"}) from exc
        self.units = units

    def start(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        metrics = self.state.metrics
        if metrics is None:
            raise RuntimeError("metrics exist once the engine is set")
        self.recorders = [metrics.recorder() for _ in self.prompts]
        self.finished = [False] * len(self.prompts)
        streams = [self.engine.generate(ids, self.params, sub_id)
                   for ids, sub_id in zip(self.prompts, self.sub_ids)]
        self._stream = merge_streams(streams)
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if self._stream is None:
            raise RuntimeError("start() first")
        async for i, out in self._stream:
            self.recorders[i].on_output(out)
            if out.finished:
                self.finished[i] = True
            yield i, out

    async def aclose(self) -> None:
        """Close the engine streams (aborting unfinished requests) and give back the units."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._stream is not None:
                aclose = getattr(self._stream, "aclose", None)
                if aclose is not None:
                    await aclose()
                for sub_id, done in zip(self.sub_ids, self.finished):
                    if not done:
                        await self.engine.abort(sub_id)
        finally:
            if self.units:
                self.state.admission.release(self.units)
                self.units = 0

    @property
    def ttft(self) -> float | None:
        times = [r.ttft for r in self.recorders if r.ttft is not None]
        return min(times) if times else None


def log_info(request: Request) -> RequestLogInfo | None:
    return log_info_of(request.scope)
