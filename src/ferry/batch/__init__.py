"""What one engine step hands between its parts: the ``Request`` (one sequence's state) and the
typed contracts (``SchedulerOutput`` -> ``ModelRunnerOutput`` -> ``EngineCoreOutput``).

NOTE: a package of its own, below both ``engine`` (scheduler, core) and ``runner``, so that the
runner can read the requests and contracts without importing the engine that drives it: the
import layers stay one-way (engine > runner > batch).
"""
