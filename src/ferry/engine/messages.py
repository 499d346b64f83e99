"""The typed messages that cross from the event loop into the engine thread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ferry.engine.output_processor import RequestState


@dataclass(frozen=True)
class AddRequest:
    state: RequestState


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class Shutdown:
    pass


EngineMessage = Union[AddRequest, AbortRequest, Shutdown]
