"""What a testbed has made, on disk, written before each thing is made.

A runner killed with SIGKILL leaves namespaces, cgroups and processes behind; `down` reads
this file (and looks for the testbed's names besides) to remove every one of them. The file
lives in `/run/e2llm-testbed/<name>/` (or `$E2LLM_TESTBED_STATE/<name>/`), next to the
logs and each device's cache; `down` removes the whole directory last.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from e2llm_edge.ops.testbed.inventory import TestbedError

_NAME = re.compile(r"^[a-z0-9]{1,12}$")


def state_root() -> Path:
    return Path(os.environ.get("E2LLM_TESTBED_STATE", "/run/e2llm-testbed"))


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise TestbedError(f"testbed name must be 1-12 characters of a-z and 0-9, got {name!r}")
    return name


def ns_prefix(name: str) -> str:
    """Every namespace of testbed `name` starts with this."""
    return f"e2tb-{name}-"


def cgroup_dirname(name: str) -> str:
    """The cgroup directory of testbed `name` (one per controller hierarchy)."""
    return f"e2tb-{name}"


@dataclass
class ProcRecord:
    """A long-lived process the testbed started."""

    pid: int
    start: int | None
    """Start time in clock ticks since boot (a reused pid differs)."""
    where: str
    """'fog' or a device id."""
    argv: list[str]


@dataclass
class State:
    """Everything one testbed holds; saved on every change."""

    name: str
    created: float = field(default_factory=time.time)
    namespaces: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    """Parent directories, one per controller; each device and the fog node below."""
    procs: dict[str, ProcRecord] = field(default_factory=dict)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Device id -> namespace, addresses, interface names, relay port."""
    fog: dict[str, Any] = field(default_factory=dict)
    """Fog namespace, broker address."""
    inventory: dict[str, Any] = field(default_factory=dict)
    model_dir: str = ""
    cluster: dict[str, Any] = field(default_factory=dict)
    """The cluster running now: method, workload, seed (empty when none)."""

    @property
    def dir(self) -> Path:
        return state_root() / self.name

    @property
    def path(self) -> Path:
        return self.dir / "state.json"

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(self.path)

    @classmethod
    def load(cls, name: str) -> State | None:
        """The saved state of testbed `name`, or None if there is none."""
        p = state_root() / check_name(name) / "state.json"
        try:
            doc = json.loads(p.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise TestbedError(f"{p}: unreadable testbed state ({exc})") from exc
        procs = {k: ProcRecord(**v) for k, v in doc.pop("procs", {}).items()}
        return cls(**doc, procs=procs)


def known_names() -> list[str]:
    """Testbeds with a state directory."""
    try:
        return sorted(p.name for p in state_root().iterdir() if (p / "state.json").exists())
    except FileNotFoundError:
        return []
