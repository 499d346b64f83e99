"""The one exception the planner raises for bad input; the CLI turns it into exit code 2."""

from __future__ import annotations


class PlannerError(ValueError):
    """A planner input is wrong (unknown GPU or model, a negative rate, a malformed file)."""
