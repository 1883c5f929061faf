"""Child processes that never outlive the process that started them."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """In a child process: ask Linux to kill it (SIGKILL) when its parent dies, so a killed run
    never leaves a child working, or holding the run's lock, beside the rerun that resumes it.
    `parent`: the pid the child was started by; if that parent is already gone, exit now."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os._exit(1)
