"""`ferry plan`: VRAM, throughput, replicas and cost for on-prem, cloud, API and hybrid serving.

Import-light on purpose: nothing here imports torch, so planning runs on any laptop.
"""

from ferry.planner.errors import PlannerError

__all__ = ["PlannerError"]
