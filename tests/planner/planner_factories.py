"""Small, honest inputs for planner tests: models, inventories, workloads."""

from __future__ import annotations

import random
from typing import Any

from planner.inventory import Inventory
from planner.model import ModelSpec
from planner.workload import Workload

MB = 1_000_000


def tiny_model(
    n_layers: int = 8,
    layer_mb: float = 40.0,
    embed_mb: float = 30.0,
    head_mb: float = 30.0,
    *,
    tied: bool = False,
    kv_bytes: float = 1536.0,
    act_bytes: float = 2304.0,
    layer_flops: float = 2.0e7,
) -> ModelSpec:
    """A uniform dense model with round numbers."""
    return ModelSpec(
        name="tiny",
        n_layers=n_layers,
        hidden_size=576,
        n_heads=9,
        head_dim=64,
        layer_param_bytes=(layer_mb * MB,) * n_layers,
        embed_param_bytes=embed_mb * MB,
        head_param_bytes=head_mb * MB,
        kv_bytes_per_token_per_layer=kv_bytes,
        activation_bytes_per_token=act_bytes,
        layer_flops_per_token=(layer_flops,) * n_layers,
        head_flops_per_token=2.0 * 49152 * 576,
        tie_word_embeddings=tied,
    )


def hardware_device(
    dev_id: str,
    memory_mb: float,
    tflops: float,
    bw: float,
    mbps: float = 920.0,
    latency_ms: float = 0.5,
) -> dict[str, Any]:
    return {
        "id": dev_id,
        "memory_mb": memory_mb,
        "link": {"bandwidth_mbps": mbps, "latency_ms": latency_ms},
        "hardware": {"tflops": tflops, "mem_bw_gbps": bw, "efficiency": 0.5},
    }


def profile_device(
    dev_id: str, memory_mb: float, scale: float, mbps: float = 920.0, latency_ms: float = 0.5
) -> dict[str, Any]:
    """A measured-profile device; `scale` multiplies every time (bigger is slower)."""
    return {
        "id": dev_id,
        "memory_mb": memory_mb,
        "link": {"bandwidth_mbps": mbps, "latency_ms": latency_ms},
        "profile": {
            "prefill_tokens": [16, 64, 256, 1024],
            "layer_prefill_s": [scale * x for x in (0.002, 0.006, 0.02, 0.08)],
            "layer_decode_s": [scale * (0.001 + 0.0002 * c) for c in range(1, 9)],
            "embed_s": scale * 1e-5,
            "head_prefill_s": scale * 0.003,
            "head_decode_s": [scale * (0.003 + 0.0005 * c) for c in range(1, 9)],
            "pass_s": scale * 0.0015,
            "io_s_per_mb": scale * 0.9,
        },
    }


def random_inventory(
    rng: random.Random,
    n: int,
    *,
    mem_range: tuple[float, float] = (80, 400),
    profiles: bool | None = None,
) -> Inventory:
    """n devices with random memory, speed and links; mixes profiles and rooflines."""
    devices = []
    for i in range(n):
        mem = rng.uniform(*mem_range)
        mbps = rng.choice([50.0, 100.0, 920.0])
        lat = rng.choice([0.2, 1.0, 3.0])
        use_profile = rng.random() < 0.5 if profiles is None else profiles
        if use_profile:
            devices.append(profile_device(f"d{i}", mem, rng.uniform(0.3, 3.0), mbps, lat))
        else:
            devices.append(
                hardware_device(
                    f"d{i}", mem, rng.uniform(0.2, 4.0), rng.uniform(4.0, 60.0), mbps, lat
                )
            )
    return Inventory.from_dict({"devices": devices}, source="random")


def workload(prompt: float = 200, output: float = 100, rate: float = 1.0) -> Workload:
    return Workload(prompt, output, rate)
