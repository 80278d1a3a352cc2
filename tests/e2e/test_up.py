"""`e2llm up` as a user runs it: one command, a request through the `openai` package,
Ctrl-C (SIGINT), and nothing left running afterwards."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from terminal import as_from_a_terminal

from e2llm_edge.ops.broker import free_port

pytestmark = [pytest.mark.model, pytest.mark.mosquitto, pytest.mark.slow]


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc's children lists)."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += list(kids - out)
            out |= kids
    return out


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_up_serves_openai_and_ctrl_c_leaves_nothing(default_model: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "e2llm_edge.cli",
            "up",
            "--agents",
            "2",
            "--port",
            str(port),
            "--model",
            str(default_model),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=as_from_a_terminal,  # Ctrl-C reaches it however the suite started
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout or []])
    reader.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while not any("e2llm chat --url" in x for x in seen):
            assert proc.poll() is None, "".join(seen)
            assert time.monotonic() < deadline, "".join(seen)
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=1))
        text = "".join(seen)
        url = f"http://127.0.0.1:{port}"
        assert f"OpenAI-compatible API: {url}/v1" in text
        assert "curl " in text and "from openai import OpenAI" in text
        model = default_model.name
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        r = c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8
        )
        assert r.choices[0].message.content and r.usage is not None
        children = descendants(proc.pid)
        assert len(children) >= 4, children  # broker, orchestrator, two agents
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal does
        assert proc.wait(60) == 0
        left = [p for p in children if running(p)]
        assert not left, left
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
        if proc.stdout is not None:
            proc.stdout.close()
