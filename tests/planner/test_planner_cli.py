"""The `plan` and `simulate` subcommands as a user runs them."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from planner import Plan
from planner.cli import main, register
from planner.sim.paper import data_path


def test_register_adds_both_subcommands() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "plan",
            "--inventory",
            "x",
            "--model",
            "y",
            "--prompt-tokens",
            "10",
            "--output-tokens",
            "5",
            "--rate",
            "1",
        ]
    )
    assert callable(args.func)
    args = parser.parse_args(["simulate"])
    assert callable(args.func)


def test_plan_writes_valid_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.yaml"
    status = main(
        [
            "plan",
            "--inventory",
            str(data_path("paper_testbed.yaml")),
            "--model",
            str(data_path("paper_model_20b.yaml")),
            "--prompt-tokens",
            "576",
            "--output-tokens",
            "588",
            "--rate",
            "1",
            "--version",
            "4",
            "-o",
            str(out),
        ]
    )
    assert status == 0
    plan = Plan.from_yaml(out.read_text())
    assert plan.version == 4 and plan.method == "e2llm"


def test_plan_from_manifest_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = {
        "config": {
            "n_layers": 4,
            "hidden_size": 64,
            "intermediate_size": 128,
            "n_heads": 4,
            "n_kv_heads": 2,
            "head_dim": 16,
            "vocab_size": 1000,
            "tie_word_embeddings": True,
        },
        "cost": {
            "layer_param_bytes": [100_000] * 4,
            "embed_param_bytes": 256_000,
            "head_param_bytes": 256_128,
            "kv_bytes_per_token_per_layer": 256,
            "activation_bytes_per_token": 256,
            "layer_flops_per_token": [200_000] * 4,
            "head_flops_per_token": 128_000,
        },
    }
    mpath = tmp_path / "manifest.yaml"
    mpath.write_text(yaml.safe_dump(manifest))
    ipath = tmp_path / "devices.yaml"
    ipath.write_text(
        yaml.safe_dump(
            {
                "link_defaults": {"bandwidth_mbps": 100, "latency_ms": 1},
                "devices": [
                    {
                        "id": f"pi-{i}",
                        "memory_mb": 1,
                        "hardware": {"tflops": 0.01, "mem_bw_gbps": 4},
                    }
                    for i in range(3)
                ],
            }
        )
    )
    status = main(
        [
            "plan",
            "--inventory",
            str(ipath),
            "--manifest",
            str(mpath),
            "--prompt-tokens",
            "32",
            "--output-tokens",
            "16",
            "--rate",
            "2",
        ]
    )
    assert status == 0
    plan = Plan.from_yaml(capsys.readouterr().out)
    assert plan.n_layers == 4


def test_plan_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "devices.yaml"
    bad.write_text(
        "devices:\n  - {id: pi-2, memory_mb: -3, hardware: {tflops: 1, "
        "mem_bw_gbps: 1}, link: {bandwidth_mbps: 1, latency_ms: 1}}\n"
    )
    status = main(
        [
            "plan",
            "--inventory",
            str(bad),
            "--model",
            str(data_path("paper_model_20b.yaml")),
            "--prompt-tokens",
            "1",
            "--output-tokens",
            "1",
            "--rate",
            "1",
        ]
    )
    assert status == 2
    assert "device 'pi-2': memory_mb must be > 0, got -3" in capsys.readouterr().err


def test_simulate_small_grid_with_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        [
            "simulate",
            "--workloads",
            "576/588",
            "--intervals",
            "1,3",
            "--requests",
            "40",
            "--methods",
            "e2llm,splitwise",
            "--out",
            str(tmp_path),
        ]
    )
    assert status == 0
    text = (tmp_path / "simulate.md").read_text()
    assert "| 576/588 | 3 | splitwise (count)" in text
    png = tmp_path / "waiting_vs_interval.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--methods", "nope", "--no-plot"]) == 2
    assert "unknown methods" in capsys.readouterr().err


def test_simulate_a_drifting_stream_from_a_phases_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    phases = tmp_path / "phases.yaml"
    phases.write_text(
        "- {prompt_tokens: 256, output_tokens: 64, interval_s: 2.0, requests: 12}\n"
        "- {prompt_tokens: 1500, output_tokens: 16, interval_s: 2.0, requests: 12}\n"
    )
    status = main(
        [
            "simulate",
            "--phases",
            str(phases),
            "--methods",
            "e2llm",
            "--routing",
            "time",
            "--max-concurrency",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    assert status == 0, capsys.readouterr().err
    text = (tmp_path / "simulate.md").read_text()
    assert "e2llm+replan" in text and "e2llm [first phase]" in text


def test_simulate_says_when_a_floor_makes_every_method_infeasible(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--workloads", "576/588", "--intervals", "1", "--requests", "10", "--no-plot"]
    floor = ["--min-tokens-per-s", "5000", "--out", str(tmp_path)]
    status = main(["simulate", *common, "--methods", "e2llm,splitwise", *floor])
    err = capsys.readouterr().err
    assert status == 2
    assert "with --min-tokens-per-s 5000 and --max-concurrency 16 every method is infeasible" in err
    assert main(["simulate", *common, "--max-concurrency", "0"]) == 2
    assert "--max-concurrency >= 1, got" in capsys.readouterr().err
    assert main(["simulate", "--workloads", "576/x", "--no-plot"]) == 2
    assert "--workloads must look like 576/588,2284/1004, got '576/x'" in capsys.readouterr().err
