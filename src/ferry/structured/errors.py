"""The one error of this package: a constraint that cannot be compiled."""

from __future__ import annotations


class GrammarError(ValueError):
    """A JSON schema, regex, choice list or grammar that cannot be compiled. ``param`` names the
    field that holds it (the request field when the server says so), and the message says so too."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
