"""What a newcomer hit (issue 13, section 6): every bad input is one line and exit code 2.

Where a traceback could slip out (a broker connection, the model, asyncio callbacks) the
``e2llm`` command runs in a subprocess, as a user runs it; the matrix of subcommands times
bad settings, which stops before any model or broker is touched, runs ``cli.main``
in-process to stay fast.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from e2llm_edge.cli import main
from e2llm_edge.device.profile import load_or_measure_profile
from e2llm_edge.ops.broker import Credentials, MosquittoBroker, MosquittoConfig, free_port
from e2llm_edge.ops.demo import bundled_inventory
from onnx_export.manifest import Manifest

E2LLM = [sys.executable, "-m", "e2llm_edge.cli"]

BROKER_COMMANDS = {
    "generate": ["generate", "hi"],
    "agent": ["agent", "--device-id", "pi-a", "--memory-mb", "400"],
    "orchestrator": ["orchestrator"],
    "monitor": ["monitor", "--once"],
    "health": ["health", "--orchestrator"],
}
"""Every subcommand that talks to a broker, with the other arguments it requires."""


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Exit status and stderr lines of ``e2llm ARGV`` run in this process."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = int(exc.code or 0)
    return rc, capsys.readouterr().err.splitlines()


def run_cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*E2LLM, *argv], capture_output=True, text=True, timeout=timeout)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a refused command (exit 2, no traceback)."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def argparse_error(rc: int, lines: list[str]) -> str:
    """argparse's own format: usage, then one error line."""
    assert rc == 2 and lines and lines[0].startswith("usage:"), lines
    assert not any("Traceback" in line for line in lines)
    return lines[-1]


# ------------------------------------------------------------------ the broker


@pytest.mark.parametrize("command", ["generate", "health", "monitor", "demo"])
def test_unreachable_broker_is_one_line_at_once(command: str) -> None:
    """One-shot commands (and the demo, before it starts any process) stop at once."""
    port = free_port()  # nothing listens there: the connection is refused
    t0 = time.monotonic()
    argv = BROKER_COMMANDS.get(command, [command])
    proc = run_cli(*argv, "--broker", f"mqtt://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5.0  # it used to wait the whole 10 s connect timeout
    assert (
        one_line(proc) == f"error: cannot reach the broker at 127.0.0.1:{port}: connection refused"
    )


def test_unknown_broker_host_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = run_main(["generate", "--broker", "mqtt://no-such-host.invalid", "hi"], capsys)
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(
        "error: cannot reach the broker at no-such-host.invalid:1883: unknown host ("
    )


@pytest.mark.parametrize("command", [*sorted(BROKER_COMMANDS), "demo"])
@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:1883", "expected mqtt://host[:port] or mqtts://host[:port]"),
        ("mqtt://fog:18x3", "bad port (Port could not be cast to integer value as '18x3')"),
    ],
)
def test_bad_broker_url_is_one_line(
    command: str, url: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, err = run_main([*BROKER_COMMANDS.get(command, [command]), "--broker", url], capsys)
    assert (rc, err) == (2, [f"error: broker URL {url!r}: {why}"])


@pytest.mark.parametrize("command", sorted(BROKER_COMMANDS))
def test_missing_or_empty_password_file_is_one_line(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [*BROKER_COMMANDS[command], "--broker", "mqtt://127.0.0.1:1883", "--username", "u"]
    missing = tmp_path / "u.password"
    rc, err = run_main([*base, "--password-file", str(missing)], capsys)
    assert (rc, err) == (
        2,
        [f"error: --password-file {missing}: cannot read it (No such file or directory)"],
    )
    missing.write_text("\n")
    rc, err = run_main([*base, "--password-file", str(missing)], capsys)
    assert (rc, err) == (2, [f"error: --password-file {missing}: the file is empty"])


@pytest.mark.mosquitto
@pytest.mark.parametrize("command", ["generate", "health", "monitor"])
def test_wrong_password_is_one_line(
    command: str,
    auth_mosquitto: tuple[MosquittoBroker, Credentials],
    tmp_path: Path,
) -> None:
    """(The agent's wrong password runs in tests/deploy/test_secure_cluster.py, against a
    cluster whose model and profile are already there.)"""
    broker, _ = auth_mosquitto
    wrong = tmp_path / "client.password"
    wrong.write_text("not-the-password\n")
    proc = run_cli(
        *BROKER_COMMANDS[command],
        *("--broker", broker.url, "--cluster", "aclc"),
        *("--username", "client", "--password-file", str(wrong)),
    )
    assert one_line(proc) == (
        f"error: broker refused user 'client': [code:135] Not authorized "
        f"(broker at {broker.host}:{broker.port})"
    )


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.mosquitto
def test_a_service_started_before_its_broker_says_so_once_and_serves_when_it_comes(
    default_model: Path, tmp_path: Path
) -> None:
    """The orchestrator is a service: it waits for the broker (one line), and once the
    broker is up it publishes its state, which `e2llm health` reads."""
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    log = tmp_path / "orchestrator.log"
    with log.open("w") as out:
        orch = subprocess.Popen(
            [
                *E2LLM,
                "orchestrator",
                "--broker",
                url,
                "--cluster",
                "early",
                "--model",
                str(default_model),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "cannot reach" not in log.read_text() and time.monotonic() < deadline:
            assert orch.poll() is None, log.read_text()
            time.sleep(0.2)
        time.sleep(1.0)  # a few more refused attempts: still one line
        assert orch.poll() is None, log.read_text()
        lines = log.read_text().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].endswith(
            f"WARNING e2llm_edge.wire.bus: cannot reach the broker at 127.0.0.1:{port}: "
            "connection refused; retrying until it answers"
        )
        (tmp_path / "broker").mkdir()
        with MosquittoBroker(MosquittoConfig(port=port), workdir=tmp_path / "broker"):
            health = run_cli(
                "health", "--orchestrator", "--broker", url, "--cluster", "early", "--timeout", "20"
            )
            assert health.returncode == 0, health.stderr
            assert health.stdout.startswith("orchestrator: online")
        assert "answers now" in log.read_text()
    finally:
        os.killpg(orch.pid, signal.SIGTERM)
        orch.wait(10)
    assert "Traceback" not in log.read_text()


# ------------------------------------------------------------- generation parameters


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--max-new-tokens", "-5", "hi"], "max_new_tokens must be at least 1, got -5"),
        (["--max-new-tokens", "0", "hi"], "max_new_tokens must be at least 1, got 0"),
        (["--temperature", "-1", "hi"], "temperature must be in [0, 10], got -1.0"),
        (["--top-p", "0", "hi"], "top_p must be in (0, 1], got 0.0"),
        (["--seed", "-3", "hi"], "seed must be a non-negative integer, got -3"),
        (["  "], "empty prompt: nothing to generate from"),
    ],
)
@pytest.mark.parametrize("where", ["local", "cluster"])
def test_generation_parameters_are_checked_once_for_both_paths(
    flags: list[str], line: str, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same lines locally and with --broker, before a model loads or a broker is asked
    (the broker URL here would be refused: the parameters are refused first)."""
    broker = ["--broker", f"mqtt://127.0.0.1:{free_port()}"] if where == "cluster" else []
    rc, err = run_main(["generate", *broker, *flags], capsys)
    assert (rc, err) == (2, [f"error: {line}"])


def test_local_generate_refuses_bad_parameters_as_a_user_runs_it() -> None:
    assert one_line(run_cli("generate", "--max-new-tokens", "-5", "hi")) == (
        "error: max_new_tokens must be at least 1, got -5"
    )


@pytest.mark.slow
@pytest.mark.model
def test_local_generate_checks_the_context_window(default_model: Path) -> None:
    proc = run_cli("generate", "--model", str(default_model), "--max-new-tokens", "8190", "hi")
    assert re.fullmatch(
        r"error: prompt of \d+ tokens \+ max_new_tokens 8190 exceeds the context of 8192 tokens",
        one_line(proc),
    )


# --------------------------------------------------------------- inventories and files

TRUNCATED = "line 2, column 1: expected the node content, but found '<stream end>'"
"""How PyYAML's complaint about a file cut short reads, in one line."""

TYPO = "devices:\n  - id: pi-a\n    memroy_mb: 400\n"
TYPO_LINE = (
    "{path}: device 'pi-a': unknown field 'memroy_mb' "
    "(expected one of ['hardware', 'id', 'link', 'memory_mb', 'profile'])"
)


@pytest.mark.parametrize(
    "argv",
    [
        ["orchestrator", "--broker", "mqtt://127.0.0.1:1", "--inventory"],
        ["demo", "--inventory"],
        ["broker", "init", "--out", "{tmp}/secrets", "--devices"],
    ],
    ids=["orchestrator", "demo", "broker-init"],
)
def test_a_typo_in_a_device_list_names_file_device_and_field(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One validation for every command that reads a device list (demo and broker init
    used to raise KeyError or accept the typo); it runs before anything starts."""
    path = tmp_path / "devices.yaml"
    path.write_text(TYPO)
    rc, err = run_main([a.format(tmp=tmp_path) for a in argv] + [str(path)], capsys)
    assert (rc, err) == (2, ["error: " + TYPO_LINE.format(path=path)])
    assert not (tmp_path / "secrets").exists()


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (None, "{path}: cannot read inventory: [Errno 2] No such file or directory: '{path}'"),
        (
            "devices: [\n",
            "{path}: not valid YAML: " + TRUNCATED,
        ),
        ("devices: []\n", "{path}: devices must be a non-empty list, got []"),
    ],
)
def test_orchestrator_inventory_is_read_at_start(
    text: str | None, line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "devices.yaml"
    if text is not None:
        path.write_text(text)
    rc, err = run_main(
        ["orchestrator", "--broker", "mqtt://127.0.0.1:1", "--inventory", str(path)], capsys
    )
    assert (rc, err) == (2, ["error: " + line.format(path=path)])


MINIMAL = "devices:\n  - {id: pi-a, memory_mb: 420}\n  - {id: pi-b, memory_mb: 420}\n"


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.mosquitto
def test_orchestrator_accepts_an_inventory_of_ids_and_memory(
    mosquitto: MosquittoBroker, default_model: Path, tmp_path: Path
) -> None:
    """Agents announce their measured profiles and links: the orchestrator needs no more."""
    path = tmp_path / "devices.yaml"
    path.write_text(MINIMAL)
    log = tmp_path / "orchestrator.log"
    with log.open("w") as out:
        orch = subprocess.Popen(
            [
                *E2LLM,
                *("orchestrator", "--broker", mosquitto.url, "--cluster", "minimal"),
                *("--model", str(default_model), "--inventory", str(path)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert orch.poll() is None, log.read_text()  # it refused the inventory
            health = run_cli(
                *("health", "--orchestrator", "--broker", mosquitto.url),
                *("--cluster", "minimal", "--timeout", "2"),
            )
            if health.returncode == 0 or time.monotonic() > deadline:
                break
        assert health.returncode == 0, health.stderr
    finally:
        if orch.poll() is None:
            os.killpg(orch.pid, signal.SIGTERM)
        orch.wait(10)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (None, "--plan {path}: cannot read it (No such file or directory)"),
        (
            "replicas: [\n",
            "--plan {path}: not valid YAML: " + TRUNCATED,
        ),
        ("method: e2llm\n", "--plan {path}: plan: version must be an integer >= 1, got None"),
    ],
)
def test_orchestrator_pinned_plan_is_read_at_start(
    text: str | None, line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to be read when the devices were there, and crash the service then."""
    path = tmp_path / "plan.yaml"
    if text is not None:
        path.write_text(text)
    rc, err = run_main(
        ["orchestrator", "--broker", "mqtt://127.0.0.1:1", "--plan", str(path)], capsys
    )
    assert (rc, err) == (2, ["error: " + line.format(path=path)])


# ------------------------------------------------------------- the rest of the sweep


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["generate", "--threads", "0", "hi"], "argument --threads: must be >= 1, got 0"),
        (["profile", "--threads", "-2"], "argument --threads: must be >= 1, got -2"),
        (
            ["agent", "--broker", "mqtt://h", "--device-id", "a", "--memory-mb", "-5"],
            "argument --memory-mb: must be > 0, got -5",
        ),
        (
            ["agent", "--broker", "mqtt://h", "--device-id", "a", "--memory-mb", "lots"],
            "argument --memory-mb: expected a number, got 'lots'",
        ),
        (
            ["orchestrator", "--broker", "mqtt://h", "--expect-devices", "0"],
            "argument --expect-devices: must be >= 1, got 0",
        ),
        (
            ["orchestrator", "--broker", "mqtt://h", "--drain-timeout", "-1"],
            "argument --drain-timeout: must be >= 0, got -1",
        ),
        (
            ["monitor", "--broker", "mqtt://h", "--interval", "0"],
            "argument --interval: must be > 0, got 0",
        ),
        (["demo", "--requests", "0"], "argument --requests: must be >= 1, got 0"),
        (
            ["demo", "--method", "magic"],
            "argument --method: invalid choice: 'magic' "
            "(choose from 'e2llm', 'splitwise', 'pipeline', 'memprop')",
        ),
    ],
)
def test_out_of_range_flags_are_refused_by_argparse(
    argv: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before anything starts (demo --requests 0 used to start a whole cluster and
    answer nothing; a negative memory budget reached the planner)."""
    assert argparse_error(*run_main(argv, capsys)) == f"e2llm {argv[0]}: error: {line}"


def test_files_and_values_of_plan_and_simulate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inv = str(bundled_inventory())
    bad = tmp_path / "bad.yaml"
    bad.write_text("config: [\n")
    work = ["--prompt-tokens", "8", "--output-tokens", "8", "--rate", "1"]
    rc, err = run_main(["plan", "--inventory", inv, "--manifest", str(bad), *work], capsys)
    assert (rc, err) == (
        2,
        [f"error: {bad}: not valid YAML: {TRUNCATED}"],
    )
    rc, err = run_main(["plan", "--inventory", inv, "--model", str(bad), *work], capsys)
    assert (rc, err) == (
        2,
        [f"error: {bad}: not valid YAML: {TRUNCATED}"],
    )
    sim = ["simulate", "--requests", "5", "--no-plot", "--workloads", "8/8", "--methods", "e2llm"]
    rc, err = run_main([*sim, "--intervals", "1,0", "--out", str(tmp_path / "s")], capsys)
    assert (rc, err) == (2, ["error: --intervals: expected comma-separated numbers > 0, got '1,0'"])
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, err = run_main([*sim, "--intervals", "1", "--out", str(blocker / "s")], capsys)
    assert (rc, err) == (2, [f"error: {blocker / 's'}: Not a directory"])


# ------------------------------------------------------------------------ the demo


@pytest.fixture
def two_boxes(tmp_path: Path) -> Path:
    """Two devices that each hold the model: the smallest cluster with both roles."""
    inv = yaml.safe_load(bundled_inventory().read_text())
    inv["devices"] = [
        {"id": "box-a", "memory_mb": 900, "hardware": {"tflops": 0.5, "mem_bw_gbps": 20.0}},
        {"id": "box-b", "memory_mb": 900, "hardware": {"tflops": 0.5, "mem_bw_gbps": 20.0}},
    ]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(inv))
    return path


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.mosquitto
def test_demo_with_several_requests_says_so_and_reports_each(
    mosquitto: MosquittoBroker, default_model: Path, two_boxes: Path
) -> None:
    # the agents' profile (one thread, the variant they pick) is cached before the demo
    load_or_measure_profile(Manifest.load(default_model), threads=1)
    proc = run_cli(
        "demo",
        "--broker",
        mosquitto.url,
        "--cluster",
        "demo-n",
        "--model",
        str(default_model),
        "--inventory",
        str(two_boxes),
        "--requests",
        "3",
        "--max-new-tokens",
        "6",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "profiling this machine" not in out  # cached: nothing is measured
    assert (
        "(3 copies sent at once; the first one's answer is shown, the figures cover all 3)" in out
    )
    rows = re.findall(r"^\s+(\d)\s+(\d+)\s+\d+ ms\s+\d+ ms\s+[\d.]+$", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["1", "2", "3"], out
    assert all(1 <= int(r[1]) <= 6 for r in rows)
    assert "requests completed: 3 of 3" in out
