"""`e2llm broker ...`: a cluster's identities, ACL and broker config, from its inventory.

``init`` makes, by default, a cluster CA, the broker's certificate and one client
certificate per identity (``e2llm_edge.ops.pki``), the ACL derived from the topic table,
``cluster.json`` (who has which role) and a Mosquitto config for running the broker
straight on this machine; ``--plaintext`` makes passwords instead, for a lab on a trusted
network. ``add-device``, ``add-client``, ``revoke`` and ``renew`` change one identity
and have a running broker reload (SIGHUP) without touching anyone else's key.
It also writes the HTTP gateway's API key (``gateway.api-keys``). Private keys,
passwords and API keys are mode 0600; ``broker/secrets/`` is gitignored.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

from e2llm_edge.errors import BrokerError, E2LLMError
from e2llm_edge.ops.broker import (
    AUTH_TLS,
    PID_FILE,
    BrokerTLS,
    Credentials,
    MosquittoConfig,
    Roster,
    cluster_ca,
    find_mosquitto,
    init_identities,
    init_secrets,
    render_config,
    roster,
)
from e2llm_edge.wire import topics
from planner.inventory import load_inventory

DEFAULT_OUT = Path("broker/secrets")
TLS_PORT, PLAIN_PORT = 8883, 1883
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "mosquitto")
"""Always in the broker's certificate: this machine, and the compose service name."""
RELOAD_HINT = (
    "`docker-compose exec mosquitto sh /e2llm/broker.sh reload` (compose) or "
    "`kill -HUP <mosquitto pid>`"
)


def inventory_devices(path: Path) -> list[str]:
    """Device ids of an inventory YAML, checked as the orchestrator checks it (a typo'd
    field names file, device and field) and usable as MQTT user names and topic ids."""
    inventory = load_inventory(path, require_costs=False)
    return [topics.check_id(d.id, f"{path}: device {d.id!r}: id") for d in inventory.devices]


def password_file(out_dir: Path, user: str) -> Path:
    """Where ``broker init --plaintext`` puts a user's password (for ``--password-file``)."""
    return out_dir / f"{topics.check_id(user, 'user name')}.password"


def identity_dir(out_dir: Path, name: str) -> Path:
    """Where ``broker init`` puts an identity (for ``--identity``)."""
    return out_dir / "identities" / topics.check_id(name, "identity")


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


def write_local_config(
    out_dir: Path, *, tls: bool, port: int | None = None, host: str = "0.0.0.0"
) -> Path:
    """A mosquitto.conf that uses these secrets in place (paths absolute), for running
    Mosquitto directly; ``broker/mosquitto.conf`` is the one for the container."""
    d = out_dir.resolve()
    run = d / "run"
    run.mkdir(exist_ok=True)
    port = port or (TLS_PORT if tls else PLAIN_PORT)
    cfg = MosquittoConfig(
        host=host,
        port=port,
        password_file=None if tls else d / "passwd",
        acl_file=d / "acl",
        tls=BrokerTLS.from_dir(d) if tls else None,
        persistence=True,
    )
    path = out_dir / "mosquitto.local.conf"
    path.write_text(render_config(cfg, port=port, workdir=run))
    return path


def init(
    devices: list[str],
    out_dir: Path,
    *,
    cluster: str,
    clients: list[str],
    force: bool,
    tls: bool = True,
    hosts: list[str] | None = None,
    port: int | None = None,
) -> tuple[Roster, list[Path]]:
    """Generate a cluster's secrets; refuses to overwrite existing ones unless ``force``
    (a new CA, or new passwords, locks out every process still holding the old ones)."""
    existing = (out_dir / Roster.FILE).exists() or (out_dir / "credentials.json").exists()
    if existing and not force:
        raise BrokerError(
            f"{out_dir} already holds a cluster's secrets; pass --force to re-key the "
            "whole cluster (every process then needs its new identity)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir.chmod(0o700)
    if tls:
        names = list(dict.fromkeys([*(hosts or []), *DEFAULT_HOSTS]))
        r = roster(devices, cluster=cluster, clients=clients, auth=AUTH_TLS, hosts=names)
        for stale in ("passwd", "credentials.json"):
            (out_dir / stale).unlink(missing_ok=True)
        init_identities(out_dir, r)
        files = [
            out_dir / f
            for f in ("ca.crt", "ca.key", "crl.pem", "broker.crt", "broker.key", "acl", Roster.FILE)
        ]
        files += [identity_dir(out_dir, n) for n in r.names()]
    else:
        creds = init_secrets(out_dir, devices, cluster=cluster, clients=clients)
        r = Roster.load(out_dir)
        files = [out_dir / "passwd", out_dir / "acl", out_dir / "credentials.json"]
        files += write_password_files(out_dir, creds)
        (out_dir / "passwd").chmod(0o600)
    files.append(write_api_keys(out_dir))
    files.append(write_local_config(out_dir, tls=tls, port=port))
    return r, files


def reload_broker(out_dir: Path) -> str:
    """SIGHUP the Mosquitto started with this directory's ``mosquitto.local.conf`` (it
    re-reads the ACL, CRL and certificates); otherwise say how to reload it."""
    pid_path = out_dir / "run" / PID_FILE
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_path.read_text().strip())
        if Path(f"/proc/{pid}/comm").read_text().strip() == "mosquitto":
            os.kill(pid, signal.SIGHUP)
            return f"Mosquitto (pid {pid}) reloaded its ACL and CRL"
    return f"now have the broker reload its ACL and CRL: {RELOAD_HINT}"


def _tls_roster(out_dir: Path) -> Roster:
    r = Roster.load(out_dir)
    if r.auth != AUTH_TLS:
        raise BrokerError(
            f"{out_dir} holds a plaintext lab cluster (passwords): identities need TLS; "
            "re-key it with `e2llm broker init --force`"
        )
    return r


def _ca(out_dir: Path) -> Any:
    return cluster_ca()(out_dir)


def add_identity(out_dir: Path, name: str, role: str) -> Path:
    """Admit a new device or client: its certificate, a place in the ACL."""
    r = _tls_roster(out_dir)
    r.add(name, role)
    path = _ca(out_dir).issue_identity(name, role)
    r.save(out_dir)
    return Path(path)


def revoke_identity(out_dir: Path, name: str) -> list[int]:
    """Lock ``name`` out: its serials into the CRL, deny-all in the ACL."""
    r = _tls_roster(out_dir)
    r.revoke(name)
    serials: list[int] = _ca(out_dir).revoke(name)
    r.save(out_dir)
    return serials


def renew_identity(out_dir: Path, name: str, hosts: list[str]) -> list[int]:
    """A new key and certificate for ``name`` (or the broker), the old ones revoked."""
    r = _tls_roster(out_dir)
    if name == "broker":
        r.hosts = list(dict.fromkeys([*hosts, *r.hosts]))
        serials: list[int] = _ca(out_dir).renew(name, "broker", hosts=r.hosts)
    else:
        role = r.role_of(name)
        if role is None:
            raise BrokerError(f"{name!r} is not an identity of cluster {r.cluster!r}")
        serials = _ca(out_dir).renew(name, role)
    r.save(out_dir)
    return serials


# --------------------------------------------------------------------------- commands


def _fail(exc: E2LLMError) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def cmd_broker_init(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        devices = inventory_devices(Path(args.devices))
        r, files = init(
            devices,
            out,
            cluster=args.cluster,
            clients=args.client or ["client"],
            force=args.force,
            tls=not args.plaintext,
            hosts=args.host or [],
            port=args.port,
        )
    except E2LLMError as exc:
        return _fail(exc)
    tls = r.auth == AUTH_TLS
    how = "TLS with client certificates" if tls else "PLAINTEXT with passwords (lab only)"
    print(f"cluster {r.cluster!r}: {how}; secrets in {out}/ (keep them out of git):")
    for f in files:
        print(f"  {f}{'/' if f.is_dir() else ''}  ({oct(f.stat().st_mode & 0o777)})")
    print("identities: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in r.roles.items() if v))
    try:
        mosquitto = find_mosquitto()
    except BrokerError:
        mosquitto = "mosquitto"
    orch, dev = r.roles["orchestrator"][0], r.roles["device"][0]
    if tls:
        print(f"""broker certificate for: {", ".join(r.hosts)}
  (another name: `e2llm broker renew broker --host NAME`)
ca.key signs new identities: keep it on this machine only.

start Mosquitto with it:
  docker-compose up -d mosquitto                 # broker/mosquitto.conf, in the container
  {mosquitto} -c {out}/mosquitto.local.conf   # or directly on this machine (port 8883)
then give each process its own identity directory (copy it to that machine), e.g.:
  e2llm orchestrator --broker mqtts://HOST:8883 --cluster {r.cluster} \\
      --identity {identity_dir(out, orch)} ...
  e2llm agent --broker mqtts://HOST:8883 --cluster {r.cluster} --device-id {dev} \\
      --identity {identity_dir(out, dev)} ...""")
    else:
        print(f"""
start Mosquitto with it (directly; the compose file needs TLS):
  {mosquitto} -c {out}/mosquitto.local.conf   # port 1883, passwords sent in the clear
then give each process its own user, e.g.:
  e2llm orchestrator --broker mqtt://HOST:1883 --cluster {r.cluster} \\
      --username {orch} --password-file {password_file(out, orch)} ...
  e2llm agent --broker mqtt://HOST:1883 --cluster {r.cluster} --device-id {dev} \\
      --username {dev} --password-file {password_file(out, dev)} ...""")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    out = Path(args.out)
    role = "client" if args.broker_command == "add-client" else "device"
    try:
        path = add_identity(out, args.name, role)
    except E2LLMError as exc:
        return _fail(exc)
    print(f"{role} {args.name!r} admitted: copy {path}/ to it (--identity); {reload_broker(out)}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        serials = revoke_identity(out, args.name)
    except E2LLMError as exc:
        return _fail(exc)
    print(
        f"{args.name!r} revoked (certificate serial(s) {', '.join(f'{s:x}' for s in serials)} "
        f"in {out}/crl.pem; the ACL denies it everything); {reload_broker(out)}"
    )
    return 0


def cmd_renew(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        serials = renew_identity(out, args.name, args.host or [])
    except E2LLMError as exc:
        return _fail(exc)
    old = ", ".join(f"{s:x}" for s in serials) or "none"
    if args.name == "broker":
        hosts = ", ".join(Roster.load(out).hosts)
        print(
            f"the broker has a new key and certificate in {out}/broker.crt (for {hosts}); "
            f"the old one ({old}) is revoked; {reload_broker(out)}"
        )
    else:
        print(
            f"{args.name!r} has a new key and certificate in {identity_dir(out, args.name)}/; "
            f"the old one(s) ({old}) are revoked: install the new files before it "
            f"reconnects; {reload_broker(out)}"
        )
    return 0


def register(sub: Any) -> None:
    """Add ``broker init|add-device|add-client|revoke|renew`` to the ``e2llm`` command."""
    p = sub.add_parser("broker", help="broker tooling: a cluster's CA, identities and ACL")
    bsub = p.add_subparsers(dest="broker_command", required=True)

    def out_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument("--out", default=str(DEFAULT_OUT), help="the secrets directory")

    q = bsub.add_parser(
        "init", help="a cluster CA, broker certificate and one identity per process, and the ACL"
    )
    q.add_argument("--devices", required=True, help="inventory YAML naming the devices")
    out_arg(q)
    q.add_argument(
        "--cluster", default=topics.DEFAULT_CLUSTER, help="topics live under e2llm/<cluster>/"
    )
    q.add_argument(
        "--client", action="append", help="a client identity (repeatable; default: client)"
    )
    q.add_argument(
        "--host",
        action="append",
        help="a name or IP address clients use to reach the broker (repeatable; "
        f"{', '.join(DEFAULT_HOSTS)} are always included)",
    )
    q.add_argument("--port", type=int, help="listener port of mosquitto.local.conf")
    q.add_argument(
        "--plaintext",
        action="store_true",
        help="lab only: passwords over plain TCP instead of TLS with client certificates",
    )
    q.add_argument("--force", action="store_true", help="replace existing secrets (re-key all)")
    q.set_defaults(func=cmd_broker_init)

    for name, what in (("add-device", "a device"), ("add-client", "a client")):
        q = bsub.add_parser(name, help=f"admit {what}: a certificate and its place in the ACL")
        q.add_argument("name", help="its id (the certificate's common name)")
        out_arg(q)
        q.set_defaults(func=cmd_add)

    q = bsub.add_parser("revoke", help="lock out a device or client (CRL + ACL), then reload")
    q.add_argument("name")
    out_arg(q)
    q.set_defaults(func=cmd_revoke)

    q = bsub.add_parser("renew", help="rotate an identity's (or the broker's) key and certificate")
    q.add_argument("name", help="an identity, or 'broker'")
    q.add_argument("--host", action="append", help="with 'broker': another name it answers to")
    out_arg(q)
    q.set_defaults(func=cmd_renew)
