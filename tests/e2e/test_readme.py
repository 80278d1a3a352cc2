"""Every shell command in README.md runs as written, or is checked as far as this machine can.

Each command of the README's ``sh`` blocks must be listed in ``COMMANDS`` with its class, so
a new command without one fails ``test_every_readme_command_has_a_class``:

- ``RUN``: cheap (no serving cluster, no full-model export): run for real, as written, in a
  fresh directory per block with the README's placeholders provided (``PLACEHOLDERS``);
  it must exit 0 and print what ``EXPECT`` says.
- ``BROKER``: Mosquitto, started for real from that directory and kept up for the block.
- ``LOGIN``: long-running or needs a serving cluster: parsed by the real CLI, then logs in
  to the block's Mosquitto with exactly its ``--broker``, ``--username``, ``--password-file``.
- ``PARSE``: too slow for the suite; parsed by the real CLI (``HEAVY`` says where the same
  code runs for real).
- ``SUITE``: the test suite itself: ``bash -n``.
- ``COMPOSE``: needs a Docker engine (none here): ``docker-compose`` must accept the
  subcommand and its flags, services must exist, the command a service runs must parse.
- ``BENCH``: the script exists, compiles and declares every flag the README passes.

Inline commands in the text (```e2llm ...``` spans, ``bash scripts/demo.sh ...``) must use
real subcommands and flags (``test_inline_commands_use_real_flags``).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from e2llm_edge.cli import _bus_config, build_parser
from e2llm_edge.ops.broker import free_port
from e2llm_edge.ops.demo import bundled_inventory
from e2llm_edge.wire.bus import Bus
from onnx_export.source import cache_dir

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"

RUN, BROKER, LOGIN, PARSE, SUITE, COMPOSE, BENCH = (
    "run",
    "broker",
    "login",
    "parse",
    "suite",
    "compose",
    "bench",
)

COMMANDS: dict[str, str] = {
    "bash scripts/demo.sh": RUN,
    "bash scripts/test.sh": SUITE,
    "e2llm export": RUN,
    "e2llm export model.gguf --out models/m": RUN,
    "e2llm export path/to/hf-dir --out models/m": RUN,
    "e2llm export --ranges 0-10,10-20,20-30": PARSE,
    "e2llm export qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --out models/qwen --graph contrib "
    "--precision exact": RUN,
    "e2llm generate 'def fibonacci(n):' --model models/qwen --raw --max-new-tokens 16": RUN,
    ".venv/bin/python bench/real_models.py --models 0.5b --skip speed,batch": BENCH,
    "e2llm export --graph standard": RUN,
    "e2llm export --graph contrib --precision exact --ranges 0-30": PARSE,
    "e2llm export --graph contrib --precision int8 --ranges 0-30": PARSE,
    "e2llm generate Hello --graph contrib --precision exact": RUN,
    "e2llm generate 'What is the capital of France?' --max-new-tokens 32": RUN,
    "e2llm generate 'Once upon a time' --raw --json": RUN,
    "e2llm generate 'Tell me a joke' --temperature 0.8 --top-p 0.9 --seed 7": RUN,
    "e2llm broker init --devices devices.yaml --host fog": RUN,
    "mosquitto -c broker/secrets/mosquitto.local.conf": BROKER,
    "e2llm orchestrator --broker mqtts://fog:8883 --identity broker/secrets/identities/"
    "orchestrator --inventory devices.yaml": LOGIN,
    "e2llm agent --broker mqtts://fog:8883 --identity ./pi-a --device-id pi-a "
    "--memory-mb 400": LOGIN,
    "e2llm generate --broker mqtts://fog:8883 --identity broker/secrets/identities/client "
    "Hello": LOGIN,
    "e2llm monitor --broker mqtts://fog:8883 --identity broker/secrets/identities/monitor": LOGIN,
    "e2llm broker init --devices devices.yaml --host fog --host 192.168.1.10": RUN,
    "e2llm broker add-device pi-c": RUN,
    "e2llm broker revoke pi-b": RUN,
    "e2llm broker renew pi-a": RUN,
    "e2llm broker renew broker --host fog.lan": RUN,
    "docker-compose exec mosquitto sh /e2llm/broker.sh reload": COMPOSE,
    ".venv/bin/python bench/mqtt_roundtrip.py --tls": BENCH,
    ".venv/bin/python bench/tls_cost.py": BENCH,
    "e2llm plan --inventory devices.yaml --prompt-tokens 256 --output-tokens 128 --rate 0.5 "
    "--manifest '~/.cache/e2llm/models/smollm2-135m-instruct-q4_1/manifest.yaml'": RUN,
    "e2llm simulate --out runs/simulate": PARSE,
    "e2llm simulate --pool edge13 --min-tokens-per-s 2": PARSE,
    "e2llm simulate --trace conv --out runs/trace": PARSE,
    "e2llm simulate --phases planner/data/drift_example.yaml": PARSE,
    "e2llm broker init --devices e2llm_edge/examples/demo-devices.yaml": RUN,
    "docker-compose up -d --build": COMPOSE,
    "docker-compose ps": COMPOSE,
    "docker-compose run --rm client e2llm generate --broker mqtts://mosquitto:8883 --identity "
    "/run/e2llm-secrets/identities/client 'Why is the sky blue?'": COMPOSE,
    "docker-compose run --rm monitor": COMPOSE,
    "docker-compose down": COMPOSE,
    ".venv/bin/python bench/local_decode.py": BENCH,
    ".venv/bin/python bench/real_models.py": BENCH,
    ".venv/bin/python bench/fast_decode.py": BENCH,
    ".venv/bin/python bench/agreement.py": BENCH,
    ".venv/bin/python bench/op_profile.py": BENCH,
    ".venv/bin/python bench/distributed_decode.py": BENCH,
    ".venv/bin/python bench/range_sessions.py": BENCH,
    ".venv/bin/python bench/planner_bench.py": BENCH,
    ".venv/bin/python bench/planner_compare.py": BENCH,
    ".venv/bin/python bench/planner_binding.py": BENCH,
    ".venv/bin/python bench/mqtt_roundtrip.py": BENCH,
    ".venv/bin/python bench/chaos.py": BENCH,
    ".venv/bin/python bench/soak.py --minutes 5": BENCH,
    ".venv/bin/python bench/gateway_bench.py": BENCH,
    ".venv/bin/python bench/testbed_memory.py": BENCH,
    "e2llm testbed up": PARSE,
    "e2llm testbed status": PARSE,
    "e2llm testbed check": PARSE,
    "e2llm testbed down": PARSE,
    "e2llm testbed run --methods e2llm,splitwise,pipeline --requests 60 --rate 0.1,0.2,0.3 "
    "--workload 128/64 --seed 0 --json runs/testbed.json --plot runs/testbed.png": PARSE,
    "e2llm testbed predict --json runs/testbed.json --out runs/again.json": PARSE,
    ".venv/bin/python bench/real_models.py --models 0.5b "
    "--skip reference,ppl,speed,batch,memory,cluster": BENCH,
    "e2llm testbed run --inventory e2llm_edge/examples/testbed-qwen05.yaml "
    "--model '~/.cache/e2llm/models/qwen2.5-coder-0.5b-instruct-q4_k_m' "
    "--methods e2llm,splitwise,pipeline --requests 20 --rate 0.1,0.15,0.2 --workload 64/32 "
    "--min-tokens-per-s 2 --seed 0 --json runs/qwen.json --plot runs/qwen.png": PARSE,
    ".venv/bin/python bench/moe.py": BENCH,
    "bash scripts/setup.sh": SUITE,
    ".venv/bin/e2llm up": PARSE,
    "e2llm up --agents 2 --port 8000": PARSE,
    "e2llm gateway --broker mqtts://fog:8883 --host 0.0.0.0 --port 8000 --api-key-file "
    "broker/secrets/gateway.api-keys --identity broker/secrets/identities/client "
    "--monitor-identity broker/secrets/identities/monitor": PARSE,
    "e2llm chat --url http://fog:8000 --api-key-file broker/secrets/gateway.api-keys": PARSE,
}

HEAVY = {
    ".venv/bin/e2llm up": "a whole cluster and the HTTP API until Ctrl-C; tests/e2e/test_up.py "
    "runs it as a user would (openai request, SIGINT)",
    "e2llm up": "the same: tests/e2e/test_up.py",
    "e2llm chat": "interactive; tests/e2e/test_gateway.py drives it in a pseudo-terminal",
    "e2llm gateway": "serves until stopped, next to a cluster; tests/e2e/test_gateway.py "
    "starts it with these logins and talks to it with the openai package",
    "e2llm export --ranges": "writes ~600 MB of fp32 range segments into the shared cache; "
    "the same export runs in the default_model fixture (ranges 0-15,15-30)",
    "e2llm export --graph": "a full contrib export (int8: ~10 s); the default_model fixture "
    "runs the contrib/exact one, tests/fast the int8 one",
    "e2llm testbed predict": "reads a run's JSON (none in a fresh directory); "
    "tests/unit/test_testbed_units.py predicts bench/results/testbed.json again",
    "e2llm testbed": "needs root, builds namespaces and cgroups and profiles every device "
    "(minutes); tests/testbed/test_testbed.py runs a 3-device testbed for real",
    "e2llm simulate": "the paper's grid is minutes on 2 cores; tests/planner/test_planner_cli "
    "runs small grids, tests/planner/test_planner_drift a short drifting stream",
}
"""Why a PARSE command is not run, and where the same code runs (by command prefix)."""

PLACEHOLDERS = {
    "devices.yaml": "your inventory: a copy of e2llm_edge/examples/demo-devices.yaml",
    "model.gguf": "any Llama-family GGUF: the tiny one of tests/tiny_model.py",
    "path/to/hf-dir": "a Hugging Face directory: the same tiny model in that form",
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf": "a tiny qwen2 GGUF stored like llama.cpp's "
    "Q4_K_M (tests/quant_model.py: Q4_K, Q6_K, Q5_0, Q8_0, mixed within q/k/v)",
    "./pi-a": "the device's copy of broker/secrets/identities/pi-a/",
    "~/.cache/e2llm": "HOME is a fresh directory whose .cache/e2llm is this run's cache",
    "fog:8883": "the fog node: 127.0.0.1 and the port the README's Mosquitto listens on",
}
"""What stands in for the names a reader supplies."""

EXPECT = {
    "bash scripts/demo.sh": r"requests completed: 1 of 1",
    "e2llm export": r"\d+ segments, [\d.]+ MB",
    "e2llm export model.gguf --out models/m": r"models/m: 5 segments",
    "e2llm export path/to/hf-dir --out models/m": r"models/m: 5 segments",
    "e2llm export qwen2.5-coder-0.5b-instruct-q4_k_m.gguf": r"models/qwen: \d+ segments",
    "e2llm generate 'Once upon a time' --raw --json": r'^\{"prompt_ids": \[.*"new_ids": \[',
    "e2llm broker init --devices devices.yaml": r"identities: device: pi-a, pi-b, jetson, minipc",
    "e2llm plan --inventory devices.yaml": r"(?m)^replicas:",
}
"""A pattern the stdout of a RUN command must contain (by command prefix)."""


@dataclass(frozen=True)
class Command:
    key: str
    """The command normalised (shlex.join of its words): the key of ``COMMANDS``."""
    text: str
    """The command as the README writes it (continuation lines joined)."""
    block: int
    """Which ``sh`` block it is in (0-based)."""


def readme_commands() -> list[Command]:
    out = []
    blocks = re.findall(r"^```sh\n(.*?)^```", README.read_text(), re.S | re.M)
    for n, body in enumerate(blocks):
        for line in body.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                out.append(Command(shlex.join(argv), line.split(" #")[0].strip(), n))
    return out


def by_prefix(table: dict[str, str], key: str) -> str | None:
    return next((v for k, v in table.items() if key.startswith(k)), None)


def parse_e2llm(argv: list[str]) -> argparse.Namespace:
    assert argv[0] == "e2llm" or argv[0].endswith("/e2llm"), argv
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        raise AssertionError(f"the CLI refuses the README's {shlex.join(argv)}") from exc


def test_every_readme_command_has_a_class() -> None:
    found = [c.key for c in readme_commands()]
    unclassified = [k for k in found if k not in COMMANDS]
    assert not unclassified, f"README commands without a class in COMMANDS: {unclassified}"
    stale = [k for k in COMMANDS if k not in found]
    assert not stale, f"COMMANDS lists what the README no longer has: {stale}"
    for key, kind in COMMANDS.items():
        if kind == PARSE:
            assert by_prefix(HEAVY, key), f"{key}: say in HEAVY why it is not run"


def test_parsed_commands_are_valid_cli_lines() -> None:
    for c in readme_commands():
        if COMMANDS[c.key] in (PARSE, LOGIN) or (
            COMMANDS[c.key] == RUN and c.key.startswith("e2llm")
        ):
            if "e2llm" not in shlex.split(c.key)[0]:
                continue
            parse_e2llm(shlex.split(c.key))


def test_python_example_compiles() -> None:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
    assert blocks
    for code in blocks:
        compile(code, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_suite_script_is_valid_bash() -> None:
    for c in readme_commands():
        if COMMANDS[c.key] == SUITE:
            argv = shlex.split(c.key)
            assert argv[0] == "bash"
            subprocess.run(["bash", "-n", str(REPO / argv[1])], check=True)


def test_bench_scripts_declare_the_flags_the_readme_passes() -> None:
    for c in readme_commands():
        if COMMANDS[c.key] != BENCH:
            continue
        argv = shlex.split(c.key)
        assert argv[0] == ".venv/bin/python", c.key
        script = REPO / argv[1]
        source = script.read_text()
        compile(source, str(script), "exec")
        assert "argparse" in source, f"{script.name}: no command line to check"
        for flag in (a for a in argv[2:] if a.startswith("--")):
            assert f'"{flag}"' in source, f"{script.name} does not declare {flag}"


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> tuple[Any, list[str]]:
    """The deepest subcommand parser ``words`` name, and the words after it."""
    while words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or words[0] not in subs[0].choices:
            break
        parser, words = subs[0].choices[words[0]], words[1:]
    return parser, words


def test_inline_commands_use_real_flags() -> None:
    text = README.read_text()
    spans = re.findall(r"`(e2llm [^`]+|bash scripts/demo\.sh [^`]+)`", text)
    assert spans
    root = build_parser()
    for span in spans:
        words = shlex.split(span.replace("[", " ").replace("]", " ").replace("...", " "))
        words = ["demo", *words[2:]] if words[0] == "bash" else words[1:]
        parser, rest = _subparser(root, words)
        assert parser is not root, f"README: `{span}` names no e2llm subcommand"
        known = {o for a in parser._actions for o in a.option_strings}
        unknown = [w for w in rest if w.startswith("--") and w not in known]
        assert not unknown, f"README: `{span}`: {unknown} are not options of {parser.prog}"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose missing")
def test_compose_commands_are_accepted_by_docker_compose() -> None:
    exe = shutil.which("docker-compose")
    assert exe is not None
    services = subprocess.run(
        [exe, "-f", "compose.yaml", "config", "--services"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    helps: dict[str, str] = {}
    for c in readme_commands():
        if COMMANDS[c.key] != COMPOSE:
            continue
        argv = shlex.split(c.key)
        sub = argv[1]
        if sub not in helps:
            proc = subprocess.run(
                [exe, sub, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
            )
            assert proc.returncode == 0, f"docker-compose has no {sub!r}: {proc.stderr}"
            helps[sub] = proc.stdout
        rest = argv[2:]
        while rest and rest[0].startswith("-"):
            assert re.search(rf"(^|\s){re.escape(rest[0])}\b", helps[sub]), (
                f"docker-compose {sub} has no {rest[0]}"
            )
            rest = rest[1:]
        if sub == "run":
            assert rest and rest[0] in services, f"{c.key}: no service {rest[:1]}"
            if rest[1:]:
                parse_e2llm(rest[1:])


# ------------------------------------------------------------- running them for real


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What stands in for the names a reader supplies (``PLACEHOLDERS``), copied into
    each block's directory."""
    import quant_model  # tests/ is on sys.path (conftest.py)
    import tiny_model

    src = tmp_path_factory.mktemp("readme-placeholders")
    shutil.copy(bundled_inventory(), src / "devices.yaml")
    tiny_model.write_gguf(src / "model.gguf")
    tiny_model.write_hf_dir(src / "path" / "to" / "hf-dir", tmp_path_factory.mktemp("hf-work"))
    quant_model.write_quant_gguf(
        src / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        arch="qwen2",
        embed_type="Q5_0",
        head_type="Q8_0",
        roles=quant_model.Q4_K_M,
    )
    (src / "e2llm_edge").mkdir()
    (src / "e2llm_edge" / "examples").symlink_to(bundled_inventory().parent)
    return src


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The README's `e2llm` on PATH; ~/.cache/e2llm is this run's cache."""
    home = tmp_path_factory.mktemp("home")
    (home / ".cache").mkdir()
    (home / ".cache" / "e2llm").symlink_to(cache_dir().resolve())
    bindir = Path(sys.executable).parent
    assert (bindir / "e2llm").exists(), f"no e2llm next to {sys.executable}"
    return {**os.environ, "HOME": str(home), "PATH": f"{bindir}:{os.environ['PATH']}"}


def _run(c: Command, cwd: Path, env: dict[str, str], timeout: float) -> None:
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", "-c", c.text], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    took = time.monotonic() - t0
    assert proc.returncode == 0, f"README: `{c.text}` failed ({took:.0f} s):\n{proc.stderr[-3000:]}"
    want = by_prefix(EXPECT, c.key)
    if want:
        assert re.search(want, proc.stdout), f"README: `{c.text}` printed:\n{proc.stdout[-3000:]}"


@contextlib.contextmanager
def _broker(c: Command, cwd: Path, env: dict[str, str]) -> Iterator[int]:
    """Mosquitto as the README starts it. Its config listens on 1883; the copy run here
    listens on a free port instead, so test runs side by side do not collide."""
    argv = shlex.split(c.key)
    conf = cwd / argv[argv.index("-c") + 1]
    port = free_port()
    conf.write_text(re.sub(r"(?m)^listener 8883\b", f"listener {port}", conf.read_text()))
    proc = subprocess.Popen(
        ["bash", "-c", c.text],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, f"README: `{c.text}` exited: {proc.stderr.read()}"  # type: ignore[union-attr]
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            assert time.monotonic() < deadline, f"README: `{c.text}` never listened"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


async def _login(c: Command, cwd: Path, port: int) -> None:
    args = parse_e2llm(shlex.split(c.key))
    args.broker = args.broker.replace("fog:8883", f"127.0.0.1:{port}")
    if args.identity:
        args.identity = str(cwd / args.identity)
    async with Bus(_bus_config(args), publish_will_on_close=False) as bus:
        assert bus.connected


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.mosquitto
def test_readme_commands_run_as_written(
    default_model: Path, placeholders: Path, env: dict[str, str], tmp_path: Path
) -> None:
    if not (REPO / ".venv" / "bin" / "e2llm").exists():
        pytest.skip("the README's scripts run .venv/bin/e2llm: run the suite with scripts/test.sh")
    by_block: dict[int, list[Command]] = {}
    for c in readme_commands():
        by_block.setdefault(c.block, []).append(c)
    timings: list[str] = []
    for n, cmds in by_block.items():
        cwd = tmp_path / f"block{n}"
        shutil.copytree(placeholders, cwd, symlinks=True)
        with contextlib.ExitStack() as stack:
            port: int | None = None
            for c in cmds:
                kind = COMMANDS[c.key]
                t0 = time.monotonic()
                if kind == RUN:
                    here = REPO if c.key.startswith("bash scripts/") else cwd
                    _run(c, here, env, timeout=300)
                elif kind == BROKER:
                    port = stack.enter_context(_broker(c, cwd, env))
                elif kind == LOGIN:
                    assert port is not None, f"README: `{c.text}` comes before its broker"
                    if c.key.startswith("e2llm agent"):  # on the device, its copied identity
                        shutil.copytree(cwd / "broker/secrets/identities/pi-a", cwd / "pi-a")
                    asyncio.run(_login(c, cwd, port))
                else:
                    continue
                timings.append(f"{time.monotonic() - t0:5.1f} s  {c.key}")
    print("\n".join(timings))
