"""Admission control: bound the sequences the server holds so overload turns into fast 429s.

Definitions (also in docs/server.md):

- A request holds ``units = number of prompts x n`` sequences from admission until its last
  sequence finishes or is aborted (client gone, error).
- ``capacity = max_num_seqs + max_queue``: up to ``max_num_seqs`` sequences run in the engine's
  batch, and up to ``max_queue`` more may wait for a slot.
- A request is admitted when ``in_flight + units <= capacity``; otherwise it gets 429 with
  ``Retry-After`` at once and never reaches the engine. A request with ``units > capacity`` could
  never be admitted, so it gets 400 instead.

All bookkeeping runs on the event loop thread; no lock is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class AdmissionRejected(Exception):
    def __init__(self, in_flight: int, capacity: int) -> None:
        super().__init__(f"server is at capacity: {in_flight} sequences in flight, capacity {capacity}")
        self.in_flight = in_flight
        self.capacity = capacity


class RequestTooLarge(ValueError):
    pass


@dataclass
class AdmissionController:
    max_num_seqs: int
    max_queue: int
    in_flight: int = 0
    rejections: int = 0

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")

    @property
    def capacity(self) -> int:
        return self.max_num_seqs + self.max_queue

    @property
    def waiting(self) -> int:
        """Sequences admitted beyond the running batch: the server's view of its queue."""
        return max(0, self.in_flight - self.max_num_seqs)

    def try_acquire(self, units: int) -> None:
        if units <= 0:
            raise ValueError(f"units must be positive, got {units}")
        if units > self.capacity:
            raise RequestTooLarge(
                f"this request needs {units} sequences (prompts x n) but the server holds at most "
                f"{self.capacity}")
        if self.in_flight + units > self.capacity:
            self.rejections += 1
            raise AdmissionRejected(self.in_flight, self.capacity)
        self.in_flight += units

    def release(self, units: int) -> None:
        if units > self.in_flight:
            raise RuntimeError(f"releasing {units} units but only {self.in_flight} in flight")
        self.in_flight -= units

    @contextmanager
    def admit(self, units: int) -> Iterator[None]:
        self.try_acquire(units)
        try:
            yield
        finally:
            self.release(units)
