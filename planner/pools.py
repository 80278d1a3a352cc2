"""The bundled device pools, each with its model and the speed floor that suits it.

Kept apart from the simulator so that reading them needs no planning dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from planner.inventory import Inventory, load_inventory
from planner.model import ModelSpec, load_model_description


def data_path(name: str) -> Path:
    """Path of a packaged data file (planner/data/<name>)."""
    return Path(str(resources.files("planner") / "data" / name))


@dataclass(frozen=True)
class Pool:
    """A bundled device pool with its model and the speed floor that suits it."""

    inventory: str
    """File in planner/data."""
    model: str
    """File in planner/data."""
    min_tokens_per_s: float
    """Per-request generation floor used with it."""
    about: str
    """One line for reports."""


POOLS: dict[str, Pool] = {
    "paper": Pool(
        "paper_testbed.yaml",
        "paper_model_20b.yaml",
        15.0,
        "the paper's 7-device testbed, a gpt-oss-20b-like MoE, 15 tokens/s floor",
    ),
    "edge13": Pool(
        "edge_pool_13.yaml",
        "llama31_8b.yaml",
        2.0,
        "13 GPU and CPU boards on unequal links, Llama-3.1-8B-like fp16, 2 tokens/s floor "
        "(no board reaches 15 tokens/s with an 8B fp16 model)",
    ),
}


def pool(name: str) -> tuple[Inventory, ModelSpec, float]:
    """A bundled pool: its inventory, model and speed floor."""
    if name not in POOLS:
        raise ValueError(f"unknown pool {name!r} (expected one of {sorted(POOLS)})")
    p = POOLS[name]
    return (
        load_inventory(data_path(p.inventory)),
        load_model_description(data_path(p.model)),
        p.min_tokens_per_s,
    )
