"""Shared pytest fixtures for the whole suite."""

from __future__ import annotations

# ======================================================================= broker fixtures
# (messaging foundation: a real Mosquitto per session, unique cluster name per test)
import asyncio
import inspect
import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2llm_edge.ops.broker import Credentials, MosquittoBroker, MosquittoConfig, init_secrets

_cluster_counter = itertools.count()

ACL_DEVICES = ("dev-a", "dev-b")
ACL_CLUSTER = "aclc"


def _need_mosquitto() -> None:
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto not installed")


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """Anonymous Mosquitto on a free port with the project's rendered config."""
    _need_mosquitto()
    broker = MosquittoBroker(MosquittoConfig(), workdir=tmp_path_factory.mktemp("mosquitto"))
    with broker:
        yield broker


@pytest.fixture(scope="session")
def auth_mosquitto(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MosquittoBroker, Credentials]]:
    """Mosquitto with passwords + generated ACL for cluster ``aclc`` (devices dev-a, dev-b,
    users orchestrator, monitor, client)."""
    _need_mosquitto()
    secrets_dir = tmp_path_factory.mktemp("broker-secrets")
    creds = init_secrets(secrets_dir, ACL_DEVICES, cluster=ACL_CLUSTER)
    cfg = MosquittoConfig(password_file=secrets_dir / "passwd", acl_file=secrets_dir / "acl")
    broker = MosquittoBroker(cfg, workdir=tmp_path_factory.mktemp("mosquitto-auth"))
    with broker:
        yield broker, creds


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> str:
    """A cluster name (topic prefix) no other test uses."""
    name = "".join(ch if ch.isalnum() else "-" for ch in request.node.name)[:60].strip("-")
    return f"t{next(_cluster_counter)}-{name}"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests in a fresh event loop (no pytest-asyncio in the venv)."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    asyncio.run(pyfuncitem.obj(**{n: pyfuncitem.funcargs[n] for n in names}))
    return True


# =================================================================== end broker fixtures


# ======================================================================== model fixtures
# (the real default model, SmolLM2-135M-Instruct Q4_1: fetched and exported once per cache)
import json  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference_smollm2.json"


@pytest.fixture(scope="session")
def default_model() -> Path:
    from onnx_export.export import default_model_dir, export_model

    d = default_model_dir()
    export_model(None, d, ranges="0-15,15-30", progress=False)
    return export_model(
        None, d, ranges="0-15,15-30", progress=False, graph_name="contrib", precision="exact"
    ).directory


@pytest.fixture(scope="session")
def reference() -> dict[str, Any]:
    return json.loads(REFERENCE.read_text())  # type: ignore[no-any-return]


# ==================================================================== end model fixtures
