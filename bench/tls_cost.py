"""What TLS with client certificates costs against plaintext, side by side in one run.

Both sides run the cluster as `e2llm broker init` secures it, with the same ACL: TLS with
one certificate per process (the default), or the plaintext lab mode with passwords. So
the difference is the encryption alone. Printed, for each and as a ratio:

- broker round trips (two hops) of a 2 KB decode activation and a 1.2 MB prefill one
  (`mqtt_roundtrip.tls_case`);
- decode tokens/s through a 4-stage pipeline (one replica, agents as processes);
- KV handoff MB/s for a 512-token prompt, PREFILL replica to DECODER replica.

Rounds alternate plaintext and TLS so the machine's noise hits both alike; medians are
reported. Goals: decode within 10 %, KV handoff within 15 %.

    .venv/bin/python bench/tls_cost.py [--rounds 3] [--new-tokens 64] [--n 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import mqtt_roundtrip  # noqa: E402
from distributed_decode import (  # noqa: E402
    PROMPT,
    inventory,
    kv_handoff,
    remote_decode,
)
from machine import cpu_model  # noqa: E402

from e2llm_edge.device.profile import load_or_measure_profile  # noqa: E402
from e2llm_edge.fog.textio import ChatTokenizer  # noqa: E402
from e2llm_edge.ops import broker_cli  # noqa: E402
from e2llm_edge.ops.localcluster import LocalCluster, pinned_prefill_decoder  # noqa: E402
from onnx_export.export import default_model_dir, export_model  # noqa: E402
from onnx_export.manifest import Manifest  # noqa: E402

MODES = ("plaintext", "tls")


@contextlib.contextmanager
def clusters(
    model_dir: Path, inv: dict[str, Any], name: str, **kw: Any
) -> Iterator[dict[str, LocalCluster]]:
    """The same cluster twice: lab mode (passwords) and TLS, both with the ACL."""
    with contextlib.ExitStack() as stack:
        out = {}
        for mode in MODES:
            secrets = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "s"
            broker_cli.init(
                [d["id"] for d in inv["devices"]],
                secrets,
                cluster=f"{name}-{mode}",
                clients=["client"],
                force=False,
                tls=mode == "tls",
            )
            out[mode] = stack.enter_context(
                LocalCluster(
                    model_dir,
                    inv,
                    cluster=f"{name}-{mode}",
                    secrets_dir=secrets,
                    verbose=False,
                    **kw,
                )
            )
        for c in out.values():
            c.wait_serving(timeout=240)
        yield out


def line(what: str, got: dict[str, list[float]], unit: str, fmt: str = "{:.1f}") -> float:
    med = {k: statistics.median(v) for k, v in got.items()}
    ratio = med["tls"] / med["plaintext"]
    print(
        f"  {what:34s} plaintext {fmt.format(med['plaintext'])} {unit}  "
        f"TLS {fmt.format(med['tls'])} {unit}  TLS/plaintext {ratio:.3f}  "
        f"(rounds: {[round(x, 2) for x in got['plaintext']]} vs "
        f"{[round(x, 2) for x in got['tls']]})"
    )
    return ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--n", type=int, default=200, help="broker round trips per size and mode")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads per agent")
    ap.add_argument("--graph", default="contrib", choices=["standard", "contrib"])
    ap.add_argument("--precision", default=None, help="fp32 (standard), exact/int8 (contrib)")
    args = ap.parse_args()
    precision = args.precision or ("fp32" if args.graph == "standard" else "exact")
    variant = ["--graph", args.graph, "--precision", precision]
    load = os.getloadavg()
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {load[0]:.2f} "
        f"{load[1]:.2f} {load[2]:.2f} at start; {args.rounds} alternating rounds; "
        f"graph {args.graph}/{precision}, agents {args.threads} thread(s)"
    )

    print("\nbroker round trips (two hops; per hop is half):")
    hops = asyncio.run(mqtt_roundtrip.tls_case(args.n, args.rounds))

    model_dir = export_model(
        None,
        default_model_dir(),
        ranges="0-15,15-30",
        progress=False,
        graph_name=args.graph,
        precision=precision,
    ).directory
    manifest = Manifest.load(model_dir)
    tok = ChatTokenizer(manifest)
    ids = tok.encode_prompt(PROMPT)
    load_or_measure_profile(manifest, threads=args.threads, variant=(args.graph, precision))

    decode: dict[str, list[float]] = {m: [] for m in MODES}
    with clusters(
        model_dir,
        inventory(4, 4000),
        "tls4",
        threads=args.threads,
        orchestrator_args=["--method", "pipeline"],
        agent_args=variant,
    ) as four:
        for mode, c in four.items():
            plan = c.wait_serving(timeout=30)
            assert [len(r.stages) for r in plan.replicas] == [4], (mode, plan)
        for _ in range(args.rounds):
            for mode in MODES:
                decode[mode].append(asyncio.run(remote_decode(four[mode], ids, args.new_tokens)))

    long_ids = tok.encode_prompt("Summarise: " + "edge devices share the work. " * 120, raw=True)
    long_ids = long_ids[:512]
    kv_inv = {
        "link_defaults": {"bandwidth_mbps": 1000, "latency_ms": 0.5},
        "devices": [
            {"id": f"kv{i}", "memory_mb": 420, "hardware": {"tflops": 0.1, "mem_bw_gbps": 10}}
            for i in range(4)
        ],
    }
    kv: dict[str, list[float]] = {m: [] for m in MODES}
    kv_mb: dict[str, list[float]] = {m: [] for m in MODES}
    n_layers = int(Manifest.load(model_dir).config["n_layers"])
    plan_file = pinned_prefill_decoder(
        Path(tempfile.mkdtemp()) / "plan.json",
        ("kv0", "kv1"),
        ("kv2", "kv3"),
        n_layers,
    )
    with clusters(
        model_dir,
        kv_inv,
        "tlskv",
        threads=args.threads,
        agent_args=variant,
        orchestrator_args=["--plan", str(plan_file)],
    ) as pair:
        plans = {mode: c.wait_serving(timeout=30) for mode, c in pair.items()}
        for mode, plan in plans.items():
            roles = sorted(r.role for r in plan.replicas)
            if roles != ["decoder", "prefill"]:
                print(f"KV handoff ({mode}): plan has roles {roles}, no PREFILL->DECODER pair")
                return 1
        for _ in range(args.rounds):
            for mode in MODES:
                got = asyncio.run(kv_handoff(pair[mode], plans[mode], long_ids))
                kv[mode].append(got["bytes"] / 1e6 / max(got["handoff_s"], 1e-9))
                kv_mb[mode].append(got["bytes"] / 1e6)

    load = os.getloadavg()
    print(f"\nresults (medians; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at end)")
    for size, got in hops.items():
        per_hop = {k: [x * 1e3 / 2 for x in v] for k, v in got.items()}
        line(
            f"per hop, {size}",
            {k: [statistics.median(v)] for k, v in per_hop.items()},
            "ms",
            "{:.3f}",
        )
    r_dec = line("4-stage decode", decode, "tokens/s")
    r_kv = line(f"KV handoff ({statistics.median(kv_mb['tls']):.1f} MB)", kv, "MB/s")
    verdict = {True: "met", False: "NOT met"}
    print(
        f"\ngoals (TLS/plaintext): decode >= 0.90: {verdict[r_dec >= 0.9]} ({r_dec:.2f}); "
        f"KV handoff >= 0.85: {verdict[r_kv >= 0.85]} ({r_kv:.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
