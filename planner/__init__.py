"""Pure, deterministic planning for E2LLM on heterogeneous edge devices.

`make_plan(inventory, model, workload)` groups devices into replicas (GA), splits layers
within each replica (exact DP), assigns PREFILL/DECODER roles and decoder concurrency,
and returns a versioned `Plan`. No I/O beyond reading files you name, no clock, no
global randomness: the same inputs and seed give the same plan.
"""

from planner.errors import InventoryError, PlanError, PlanInfeasible, PlannerError
from planner.inventory import Device, DeviceProfile, Hardware, Inventory, Link, load_inventory
from planner.methods import METHODS
from planner.model import ModelSpec, load_model_description
from planner.plan import Plan, Replica, Stage
from planner.workload import Request, Workload, load_azure_trace


def make_plan(
    inventory: Inventory,
    model: ModelSpec,
    workload: Workload,
    *,
    method: str = "e2llm",
    seed: int = 0,
    version: int = 1,
    min_tokens_per_s: float = 15.0,
    max_concurrency: int = 16,
) -> Plan:
    """Plan replicas, roles, concurrency and layer splits (see `planner.make.make_plan`).

    Imported lazily: devices read plans with `planner.plan` and do not install deap.
    """
    from planner.make import make_plan as _make_plan

    return _make_plan(
        inventory,
        model,
        workload,
        method=method,
        seed=seed,
        version=version,
        min_tokens_per_s=min_tokens_per_s,
        max_concurrency=max_concurrency,
    )


__all__ = [
    "METHODS",
    "Device",
    "DeviceProfile",
    "Hardware",
    "Inventory",
    "InventoryError",
    "Link",
    "ModelSpec",
    "Plan",
    "PlanError",
    "PlanInfeasible",
    "PlannerError",
    "Replica",
    "Request",
    "Stage",
    "Workload",
    "load_azure_trace",
    "load_inventory",
    "load_model_description",
    "make_plan",
]
