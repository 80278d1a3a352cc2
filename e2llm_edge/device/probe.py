"""The agent's own cost per pass and per MB: a probe of its message path through the broker.

A pipeline stage costs more than its layers: the agent decodes the message that brings its
input, encodes and publishes its output, and a PREFILL stage sends its KV on, each through
the MQTT client, TLS and the socket. On the emulated testbed that was 2-5 ms of CPU per
decode pass and 15-32 ms per prefill hand-off beyond the layers, i.e. 20-300 ms on a
device holding a tenth of a core, which the layer profile did not show. The probe measures
it where it is paid: the agent sends itself messages through the broker and counts the
CPU time this takes (process time, so the network's latency and other processes' load do
not count), at two sizes, and fits a cost per message and a cost per byte. CPU seconds
become device seconds through the share of a CPU the process gets (a CFS quota, a busy
machine), the unit every other profile figure is in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from e2llm_edge.device.kv_transfer import KV_CHUNK_BYTES
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import Bus, Envelope

SMALL_BYTES = 2304
"""A decode step's activation (SmolLM2: 576 float32), the message of most passes."""
LARGE_BYTES = KV_CHUNK_BYTES
"""A KV chunk, the message of a hand-off."""
ROUNDS = {SMALL_BYTES: 40, LARGE_BYTES: 8}
WARMUP = 3
ROUND_TIMEOUT_S = 10.0
SHARE_WINDOW_S = 0.3


@dataclass(frozen=True)
class MessagePath:
    """What the probe found, in device seconds (see the module docstring)."""

    pass_s: float
    """One message in and one out: the agent's work per pass beyond its layers."""
    io_s_per_mb: float
    """Per MB sent or received, beyond the link."""
    cpu_share: float
    """The share of one CPU this process got while probing."""


def cpu_share(window_s: float = SHARE_WINDOW_S) -> float:
    """CPU seconds per wall second a busy loop gets here (1.0 on an idle core; a 10% CFS
    quota gives 0.1)."""
    c0, w0 = time.process_time(), time.perf_counter()
    x = 0
    while time.perf_counter() - w0 < window_s:
        x += 1
    share = (time.process_time() - c0) / (time.perf_counter() - w0)
    return min(1.0, max(share, 1e-3))


def fit(cpu_per_round: dict[int, float], share: float) -> MessagePath:
    """From CPU seconds per round trip (one send and one receive of `size` bytes) at two
    sizes: the fixed part per pass and the part per byte, as device seconds."""
    (s, cs), (big, cl) = sorted(cpu_per_round.items())
    per_byte = max(0.0, (cl - cs) / (2 * (big - s)))
    per_message = max(0.0, cs - 2 * s * per_byte)
    return MessagePath(
        pass_s=per_message / share, io_s_per_mb=per_byte * 1e6 / share, cpu_share=share
    )


async def probe_message_path(
    bus: Bus, device_id: str, keep: Callable[[Envelope], None]
) -> MessagePath:
    """Time this agent's message path (its inbox must be subscribed). Anything else that
    arrives meanwhile is handed to `keep`, in order, for the agent to process after.
    Raises BusTimeout if a probe does not come back (a broker that drops it)."""
    share = cpu_share()
    seq = 0
    per_round: dict[int, float] = {}
    for size, rounds in ROUNDS.items():
        data = np.zeros(size // 4, np.float32)
        cpu = 0.0
        for i in range(WARMUP + rounds):
            seq += 1
            c0 = time.process_time()
            await bus.publish(
                t.DEVICE_INBOX,
                m.Probe(device_id=m.DeviceId(device_id), seq=seq, data=data),
                device_id=device_id,
                timeout=ROUND_TIMEOUT_S,
            )
            deadline = time.monotonic() + ROUND_TIMEOUT_S
            while True:  # other messages arriving meanwhile do not extend the wait
                env = await bus.recv(timeout=max(0.0, deadline - time.monotonic()))
                if isinstance(env.msg, m.Probe) and env.msg.seq == seq:
                    break
                if not isinstance(env.msg, m.Probe):
                    keep(env)
            if i >= WARMUP:
                cpu += time.process_time() - c0
        per_round[size] = cpu / rounds
    return fit(per_round, share)
