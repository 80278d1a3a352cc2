"""Start a program as a terminal would, so that Ctrl-C (SIGINT) reaches it.

A shell without job control starts a background command (`cmd &`, `nohup cmd &`) with
SIGINT ignored, every program it starts inherits that, and Python then installs no
KeyboardInterrupt handler: a suite launched that way saw `e2llm up` and `e2llm chat`
ignore the Ctrl-C its tests send. A program started from a terminal has SIGINT at its
default; `as_from_a_terminal` restores that in the child before it runs.
"""

from __future__ import annotations

import signal


def as_from_a_terminal() -> None:
    """`preexec_fn` for subprocess.Popen: SIGINT at its default in the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
