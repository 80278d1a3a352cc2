"""Planner errors: every one names where the bad input came from and what was wrong.

All derive from `PlannerError`; the input errors are also `ValueError`s so callers that
validate configuration generically can catch them without importing this module.
"""

from __future__ import annotations


class PlannerError(Exception):
    """Base class of every error the planner raises on purpose."""


class InventoryError(PlannerError, ValueError):
    """A device inventory is malformed (message names source, device and field)."""


class ModelSpecError(PlannerError, ValueError):
    """A model manifest or description is malformed (message names the field)."""


class WorkloadError(PlannerError, ValueError):
    """A workload description or trace is malformed."""


class PlanError(PlannerError, ValueError):
    """A serialised plan is inconsistent (message names the replica, stage and field)."""


class PlanInfeasible(PlannerError):
    """No plan can hold and serve the model on the given devices.

    The message says what is short (e.g. which memory, by how much).
    """


def yaml_problem(e: Exception) -> str:
    """A YAML parse error in one line: where, then what (PyYAML's own text spans several)."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark else what
