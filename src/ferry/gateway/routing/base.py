"""What a routing policy sees (``Candidate``) and must do (``order`` them, best first)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from ferry.gateway.backends.base import Backend
from ferry.gateway.config import DeploymentConfig


@dataclass(frozen=True)
class Candidate:
    """A deployment that may take the request now: its location is allowed, it is up, it has room."""

    index: int  # position in the model's deployment list (config order breaks ties)
    deployment: DeploymentConfig
    backend: Backend
    saturated: bool  # over an overflow threshold: usable, but only when nothing better has room

    @property
    def location(self) -> str:
        return self.backend.location

    @property
    def load(self) -> float:
        return self.backend.inflight / self.backend.config.max_concurrency

    @property
    def input_per_mtok(self) -> float:
        d = self.deployment.input_per_mtok
        return self.backend.config.input_per_mtok if d is None else d

    @property
    def output_per_mtok(self) -> float:
        d = self.deployment.output_per_mtok
        return self.backend.config.output_per_mtok if d is None else d


class RoutingPolicy(ABC):
    """Orders candidates; the router tries them in that order until one answers."""

    name: str

    @abstractmethod
    def order(self, candidates: list[Candidate]) -> list[Candidate]:
        ...

    @staticmethod
    def split(candidates: list[Candidate]) -> tuple[list[Candidate], list[Candidate]]:
        """(with room, saturated): every policy prefers the first group."""
        return [c for c in candidates if not c.saturated], [c for c in candidates if c.saturated]
