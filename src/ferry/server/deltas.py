"""Per-choice stream deltas: what each cumulative ``RequestOutput`` adds to what a client was sent.

The engine reports every choice cumulatively (all text and tokens so far); a streamed response
sends only what is new. ``DeltaTracker`` keeps, per choice, how much text and how many tokens were
sent and which choices have finished, for chat and completions alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ferry.outputs import Logprob, RequestOutput


@dataclass(frozen=True)
class ChoiceDelta:
    """What one choice adds since its last sent delta."""

    index: int  # the choice's index in the response: prompt * n + the choice's own index
    prompt: int  # which prompt the choice answers
    text: str  # text not sent yet
    logprobs: list[Logprob]  # one per token not sent yet (none when logprobs were not asked for)
    token_offset: int  # tokens sent before this delta: the position of ``logprobs[0]``
    finish_reason: str | None
    first: bool  # the choice's first delta: nothing of it was sent before
    send: bool  # whether to send it; when False the tracker did not move (its news comes later)


@dataclass
class DeltaTracker:
    """Turns cumulative outputs into per-choice deltas; finished choices are skipped from then on.

    ``update`` returns a delta for each choice with news: new text, a finish reason, or its first
    appearance. A delta is to ``send`` when it has new text or a finish, or when it is a first one
    and ``always_send_first`` is set (completions with ``echo``, whose first chunk carries the
    prompt). NOTE: a first delta that is not sent still comes back, so chat can announce the
    assistant's role at once; its tokens' logprobs then come with the next delta sent.
    """

    n: int = 1  # choices per prompt
    always_send_first: bool = False
    _sent_text: dict[int, int] = field(default_factory=dict)  # index -> characters sent
    _sent_tokens: dict[int, int] = field(default_factory=dict)  # index -> tokens sent
    _seen: set[int] = field(default_factory=set)
    _done: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    def update(self, prompt: int, out: RequestOutput) -> list[ChoiceDelta]:
        """The deltas of ``out``, the latest cumulative output of prompt number ``prompt``."""
        deltas: list[ChoiceDelta] = []
        for c in out.outputs:
            index = prompt * self.n + c.index
            if index in self._done:
                continue
            first = index not in self._seen
            self._seen.add(index)
            text = c.text[self._sent_text.get(index, 0):]
            send = bool(text) or c.finish_reason is not None or (first and self.always_send_first)
            if not send and not first:
                continue
            token_offset = self._sent_tokens.get(index, 0)
            deltas.append(ChoiceDelta(index=index, prompt=prompt, text=text,
                                      logprobs=(c.logprobs or [])[token_offset:],
                                      token_offset=token_offset, finish_reason=c.finish_reason,
                                      first=first, send=send))
            if send:
                self._sent_text[index] = len(c.text)
                self._sent_tokens[index] = len(c.token_ids)
                if c.finish_reason is not None:
                    self._done.add(index)
        return deltas
