"""`e2llm broker init`: generate a cluster's broker secrets from its device inventory.

Writes the Mosquitto password file and ACL (``e2llm_edge.ops.broker.init_secrets``), the
credentials, one ``<user>.password`` file per user for the ``--password-file`` option of
every command, the HTTP gateway's API key (``gateway.api-keys``), and a Mosquitto config
for running the broker straight on this machine.
Everything it writes is mode 0600 except the config; ``broker/secrets/`` is gitignored.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import yaml

from e2llm_edge.errors import BrokerError, E2LLMError
from e2llm_edge.ops.broker import (
    Credentials,
    MosquittoConfig,
    find_mosquitto,
    init_secrets,
    render_config,
)
from e2llm_edge.wire import topics

DEFAULT_OUT = Path("broker/secrets")


def inventory_devices(path: Path) -> list[str]:
    """Device ids of an inventory YAML (``devices: [{id: ...}, ...]``)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise BrokerError(f"{path}: cannot read inventory: {exc}") from exc
    devices = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(devices, list) or not devices:
        raise BrokerError(f"{path}: field 'devices' must be a non-empty list")
    ids = []
    for i, d in enumerate(devices):
        if not isinstance(d, dict) or not isinstance(d.get("id"), str):
            raise BrokerError(f"{path}: devices[{i}].id must be a string, got {d!r}")
        ids.append(topics.check_id(d["id"], f"{path}: devices[{i}].id"))
    if len(set(ids)) != len(ids):
        raise BrokerError(f"{path}: device ids must be unique: {ids}")
    return ids


def password_file(out_dir: Path, user: str) -> Path:
    """Where ``broker init`` puts a user's password (for ``--password-file``)."""
    return out_dir / f"{topics.check_id(user, 'user name')}.password"


def write_password_files(out_dir: Path, creds: Credentials) -> list[Path]:
    """One 0600 file per user holding only its password."""
    written = []
    for user, password in creds.users.items():
        path = password_file(out_dir, user)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        written.append(path)
    return written


API_KEYS_FILE = "gateway.api-keys"
"""The gateway's accepted API keys (``e2llm gateway --api-key-file``), one per line."""


def write_api_keys(out_dir: Path) -> Path:
    """One random API key for the HTTP gateway, mode 0600 (add lines to rotate keys)."""
    path = out_dir / API_KEYS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"sk-e2llm-{secrets.token_urlsafe(32)}\n")
    return path


def write_local_config(out_dir: Path, port: int = 1883, host: str = "0.0.0.0") -> Path:
    """A mosquitto.conf that uses these secrets in place (paths absolute), for running
    Mosquitto directly; ``broker/mosquitto.conf`` is the one for the container."""
    run = out_dir.resolve() / "run"
    run.mkdir(exist_ok=True)
    cfg = MosquittoConfig(
        host=host,
        port=port,
        password_file=out_dir.resolve() / "passwd",
        acl_file=out_dir.resolve() / "acl",
        persistence=True,
    )
    path = out_dir / "mosquitto.local.conf"
    path.write_text(render_config(cfg, port=port, workdir=run))
    return path


def init(
    devices: list[str], out_dir: Path, *, cluster: str, clients: list[str], force: bool
) -> tuple[Credentials, list[Path]]:
    """Generate the secrets; refuses to overwrite existing ones unless ``force``
    (new passwords lock out every device still configured with the old ones)."""
    if (out_dir / "credentials.json").exists() and not force:
        raise BrokerError(
            f"{out_dir}/credentials.json exists; pass --force to generate new "
            "passwords (every device then needs its new password file)"
        )
    creds = init_secrets(out_dir, devices, cluster=cluster, clients=clients)
    files = [out_dir / "passwd", out_dir / "acl", out_dir / "credentials.json"]
    files += write_password_files(out_dir, creds)
    files.append(write_api_keys(out_dir))
    for f in files[:2]:
        f.chmod(0o600)
    files.append(write_local_config(out_dir))
    return creds, files


def cmd_broker_init(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        devices = inventory_devices(Path(args.devices))
        creds, files = init(
            devices, out, cluster=args.cluster, clients=args.client or ["client"], force=args.force
        )
    except E2LLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"broker secrets for cluster {creds.cluster!r} in {out}/ (keep them out of git):")
    for f in files:
        print(f"  {f}  ({oct(f.stat().st_mode & 0o777)})")
    print(
        "users: " + "; ".join(f"{role}: {', '.join(users)}" for role, users in creds.roles.items())
    )
    try:
        mosquitto = find_mosquitto()
    except BrokerError:
        mosquitto = "mosquitto"
    local_conf = out / "mosquitto.local.conf"
    orch = creds.roles["orchestrator"][0]
    print(f"""
start Mosquitto with it:
  docker-compose up -d mosquitto                 # broker/mosquitto.conf, in the container
  {mosquitto} -c {local_conf}   # or directly on this machine (port 1883)
then give each process its own user, e.g.:
  e2llm orchestrator --broker mqtt://HOST:1883 --cluster {creds.cluster} \\
      --username {orch} --password-file {password_file(out, orch)} ...
  e2llm agent --broker mqtt://HOST:1883 --cluster {creds.cluster} --device-id {devices[0]} \\
      --username {devices[0]} --password-file {password_file(out, devices[0])} ...""")
    return 0


def register(sub: Any) -> None:
    """Add ``broker init`` to the ``e2llm`` command."""
    p = sub.add_parser("broker", help="broker tooling: passwords and ACL for a cluster")
    bsub = p.add_subparsers(dest="broker_command", required=True)
    q = bsub.add_parser("init", help="generate passwords, ACL and credentials for a cluster")
    q.add_argument("--devices", required=True, help="inventory YAML naming the devices")
    q.add_argument("--out", default=str(DEFAULT_OUT), help="directory to write (gitignored)")
    q.add_argument(
        "--cluster", default=topics.DEFAULT_CLUSTER, help="topics live under e2llm/<cluster>/"
    )
    q.add_argument(
        "--client", action="append", help="a client user name (repeatable; default: client)"
    )
    q.add_argument("--force", action="store_true", help="replace existing secrets")
    q.set_defaults(func=cmd_broker_init)
