"""compose.yaml and the Dockerfile, checked without a Docker engine.

`docker-compose config` (the Debian package) validates and normalises the file; then every
command a project container runs, health checks included, must parse as a real `e2llm`
subcommand, and the deployment must match the device inventory and keep secrets per user.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2llm_edge.cli import build_parser
from e2llm_edge.ops.demo import bundled_inventory

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
IDENTITIES = "/run/e2llm-secrets/identities"
# (onnx is not among them: a device composes the graph of its layer range with it)
FOG_ONLY = ("tokenizers", "jinja2", "deap", "rich", "gguf", "safetensors", "cryptography")


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed")
    proc = subprocess.run(
        [exe, "-f", str(COMPOSE), "config"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)
    assert isinstance(data, dict)
    return data


def _project(svc: dict[str, Any]) -> bool:
    return "build" in svc


def _commands(config: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(where, argv) of every e2llm command a project container runs."""
    out = []
    for name, svc in config["services"].items():
        if not _project(svc):
            continue
        out.append((name, svc["command"]))
        test = svc.get("healthcheck", {}).get("test")
        if test:
            assert test[0] == "CMD", f"{name}: health check must exec e2llm directly"
            out.append((f"{name} healthcheck", test[1:]))
    return out


def _parse(argv: list[str]) -> argparse.Namespace:
    assert argv[0] == "e2llm", argv
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        raise AssertionError(f"not a valid e2llm command line: {argv}") from exc


def _devices() -> dict[str, dict[str, Any]]:
    return {d["id"]: d for d in yaml.safe_load(bundled_inventory().read_text())["devices"]}


def _agents(config: dict[str, Any]) -> dict[str, tuple[dict[str, Any], argparse.Namespace]]:
    out = {}
    for svc in config["services"].values():
        if _project(svc) and svc["command"][1] == "agent":
            args = _parse(svc["command"])
            out[args.device_id] = (svc, args)
    return out


def test_compose_file_is_valid(config: dict[str, Any]) -> None:
    assert {"mosquitto", "model", "orchestrator", "client", "monitor"} <= set(config["services"])
    assert config["services"]["mosquitto"]["image"].startswith("eclipse-mosquitto:2")


def test_every_service_command_is_a_real_e2llm_subcommand(config: dict[str, Any]) -> None:
    cmds = _commands(config)
    assert len(cmds) >= 10
    seen = set()
    for where, argv in cmds:
        args = _parse(argv)
        assert callable(args.func), where
        seen.add(argv[1])
    assert {"export", "orchestrator", "agent", "health", "generate", "monitor", "gateway"} <= seen


def test_images_come_from_the_dockerfile_targets(config: dict[str, Any]) -> None:
    stages = set(
        re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M | re.I)
    )
    for name, svc in config["services"].items():
        if _project(svc):
            assert svc["build"]["target"] in stages, name
            assert Path(svc["build"]["context"]) == ROOT, name
    # devices get the slim image: the base dependencies only
    for svc, _ in _agents(config).values():
        assert svc["build"]["target"] == "agent"
    dockerfile = (ROOT / "Dockerfile").read_text()
    agent_stage = dockerfile.split("AS agent", 1)[1].split("FROM", 1)[0]
    assert re.search(r"pip install \.(\s|$)", agent_stage), agent_stage


def test_agents_match_the_inventory_and_are_unequal(config: dict[str, Any]) -> None:
    agents = _agents(config)
    devices = _devices()
    assert set(agents) == set(devices)
    limits = set()
    for dev, (svc, args) in agents.items():
        assert args.memory_mb == devices[dev]["memory_mb"], dev
        assert "cpus" in svc and "mem_limit" in svc, dev
        limits.add((float(svc["cpus"]), str(svc["mem_limit"])))
        assert svc["depends_on"]["mosquitto"]["condition"] == "service_healthy"
        assert svc["depends_on"]["model"]["condition"] == "service_completed_successfully"
        health = _parse(svc["healthcheck"]["test"][1:])
        assert health.command == "health" and health.device_id == dev
        assert health.identity == f"{IDENTITIES}/monitor"  # read-only: retained state
    assert len(limits) == len(agents), "every device gets its own CPU/memory limits"


def test_one_model_export_serves_everyone(config: dict[str, Any]) -> None:
    services = config["services"]
    export = _parse(services["model"]["command"])
    assert export.command == "export"
    users = [_parse(services[n]["command"]) for n in ("orchestrator", "gateway")]
    users += [a for _, a in _agents(config).values()]
    for args in users:
        assert args.model == export.out
    volume = export.out.split("/")[1]
    for name in [
        "model",
        "orchestrator",
        "gateway",
        *[n for n, s in services.items() if _project(s) and s["command"][1] == "agent"],
    ]:
        mounts = [v for v in services[name]["volumes"] if isinstance(v, str)]
        assert any(v.startswith("models:/" + volume) for v in mounts), (name, mounts)


def _mounts(svc: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of a service's bind mounts and volumes."""
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            src, dst = v.split(":")[:2]
        else:
            src, dst = v.get("source", ""), v.get("target", "")
        out.append((src, dst))
    return out


def test_each_process_speaks_tls_as_itself_with_only_its_identity(
    config: dict[str, Any],
) -> None:
    check = subprocess.run(["git", "check-ignore", "-q", "broker/secrets/x.key"], cwd=ROOT)
    assert check.returncode == 0, "broker/secrets/ must be gitignored"
    assert "secrets" not in config or not config["secrets"], "passwords are the lab mode"
    identities = ROOT / "broker" / "secrets" / "identities"
    used: dict[str, set[str]] = {}
    for where, argv in _commands(config):
        args = _parse(argv)
        if getattr(args, "broker", None) is None:
            continue
        assert args.broker == "mqtts://mosquitto:8883", where
        assert args.username is None and args.password_file is None, where
        assert args.identity and args.identity.startswith(f"{IDENTITIES}/"), where
        idents = [args.identity, getattr(args, "monitor_identity", None)]  # gateway: two
        for ident in filter(None, idents):
            assert ident.startswith(f"{IDENTITIES}/"), where
            used.setdefault(where.split()[0], set()).add(ident.rsplit("/", 1)[1])
        assert getattr(args, "monitor_username", None) is None, where
    for name, svc in config["services"].items():
        mounts = _mounts(svc)
        for src, _ in mounts:
            assert not src.rstrip("/").endswith("broker/secrets"), f"{name} mounts all secrets"
            assert not src.endswith("ca.key"), f"{name} holds the CA's key"
        mounted = {Path(src).name for src, _ in mounts if Path(src).parent == identities}
        if _project(svc):
            assert mounted == used.get(name, set()), name
            for ident in mounted:  # where the entrypoint copies it from
                assert (str(identities / ident), f"/run/secrets/identities/{ident}") in mounts
    broker_files = {
        Path(src).name
        for src, _ in _mounts(config["services"]["mosquitto"])
        if Path(src).parent == ROOT / "broker" / "secrets"
    }
    assert broker_files == {"ca.crt", "broker.crt", "broker.key", "crl.pem", "acl"}
    conf = (ROOT / "broker" / "mosquitto.conf").read_text().splitlines()
    for line in (
        "require_certificate true",
        "use_identity_as_username true",
        "listener 8883 0.0.0.0",
    ):
        assert line in conf, line
    assert not [x for x in conf if x.startswith("listener") and "8883" not in x], "plaintext"
    assert not [x for x in conf if x.startswith("password_file")]


def test_agent_image_commands_need_no_fog_extras() -> None:
    """What the agent image runs (agent, health, generate) imports none of the fog extras."""
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {FOG_ONLY!r}:
            raise ImportError('fog-only module imported: ' + name)
sys.meta_path.insert(0, Block())
from e2llm_edge.cli import build_parser
p = build_parser()
for argv in (['agent', '--broker', 'mqtts://b', '--device-id', 'd', '--memory-mb', '1'],
             ['health', '--broker', 'mqtts://b', '--device-id', 'd'],
             ['generate', '--broker', 'mqtts://b', 'hi']):
    p.parse_args(argv)
import e2llm_edge.device.agent, e2llm_edge.client, e2llm_edge.ops.monitor, e2llm_edge.wire.tls
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def test_gateway_is_published_with_its_api_key_from_broker_init(config: dict[str, Any]) -> None:
    svc = config["services"]["gateway"]
    args = _parse(svc["command"])
    assert args.command == "gateway" and args.host == "0.0.0.0"
    published = {(str(p["target"]), str(p.get("published"))) for p in svc["ports"]}
    assert (str(args.port), str(args.port)) in published
    key = Path(args.api_key_file)
    assert key == Path("/run/e2llm-secrets/gateway.api-keys")  # copied by the entrypoint
    src = ROOT / "broker" / "secrets" / "gateway.api-keys"  # written by broker init
    assert (str(src), "/run/secrets/gateway.api-keys") in _mounts(svc)
    assert args.identity == f"{IDENTITIES}/client"
    assert args.monitor_identity == f"{IDENTITIES}/monitor"
    assert svc["depends_on"]["orchestrator"]["condition"] == "service_healthy"
    health = _parse(svc["healthcheck"]["test"][1:])
    assert health.command == "health" and health.url.endswith(f":{args.port}/health")
    assert svc["build"]["target"] == "fog"
    fog = (ROOT / "Dockerfile").read_text().split("AS fog", 1)[1]
    assert "gateway" in fog  # the fog image installs the gateway extra


def test_broker_init_writes_the_gateway_api_key(tmp_path: Path) -> None:
    pytest.importorskip("aiohttp")
    from e2llm_edge.fog.gateway import read_api_keys
    from e2llm_edge.ops.broker_cli import API_KEYS_FILE, init

    _, files = init(["d1"], tmp_path, cluster="c", clients=["client"], force=False)
    path = tmp_path / API_KEYS_FILE
    assert path in files and path.stat().st_mode & 0o777 == 0o600
    (key,) = read_api_keys(path)
    assert key.startswith("sk-e2llm-") and len(key) > 40
