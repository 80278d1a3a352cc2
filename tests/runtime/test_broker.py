"""Broker tooling: binary discovery and rendered config."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2llm_edge.errors import BrokerError
from e2llm_edge.ops import broker


def test_missing_binary_explains_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2LLM_MOSQUITTO", "/nonexistent/mosquitto")
    monkeypatch.setattr(broker.shutil, "which", lambda _name: None)
    monkeypatch.setattr(broker.os, "access", lambda _p, _m: False)
    with pytest.raises(BrokerError, match="apt-get install mosquitto"):
        broker.find_mosquitto()


def test_rendered_config_has_nodelay_packet_limit_and_auth(tmp_path: Path) -> None:
    cfg = broker.MosquittoConfig(
        password_file=tmp_path / "passwd", acl_file=tmp_path / "acl", persistence=True
    )
    text = broker.render_config(cfg, port=1234, workdir=tmp_path)
    for line in (
        "listener 1234 127.0.0.1",
        "allow_anonymous false",
        "set_tcp_nodelay true",
        f"max_packet_size {4 * 1024 * 1024 + 64 * 1024}",
        "persistence true",
        f"password_file {tmp_path / 'passwd'}",
    ):
        assert line in text.splitlines()


def test_rendered_tls_config_requires_client_certificates_and_checks_the_crl(
    tmp_path: Path,
) -> None:
    cfg = broker.MosquittoConfig(acl_file=tmp_path / "acl", tls=broker.BrokerTLS.from_dir(tmp_path))
    lines = broker.render_config(cfg, port=8883, workdir=tmp_path).splitlines()
    d = tmp_path.resolve()
    assert lines.index("listener 8883 127.0.0.1") < lines.index(f"cafile {d / 'ca.crt'}")
    for line in (
        f"certfile {d / 'broker.crt'}",
        f"keyfile {d / 'broker.key'}",
        f"crlfile {d / 'crl.pem'}",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        f"acl_file {tmp_path / 'acl'}",
        f"pid_file {tmp_path / 'mosquitto.pid'}",
    ):
        assert line in lines
    assert not [x for x in lines if x.startswith("password_file")]
