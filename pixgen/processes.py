"""Child processes that never outlive the process that started them, or that they work for."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import threading

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """In a child process: ask Linux to kill it (SIGKILL) when its parent dies, so a killed run
    never leaves a child working, or holding the run's lock, beside the rerun that resumes it.
    `parent`: the pid the child was started by; if that parent is already gone, exit now."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def die_with(pid: int) -> None:
    """In a process whose parent is not the one it serves (a pipeline's stage, forked by the stage
    server on behalf of `pixgen run`): kill it (SIGKILL) as soon as process `pid` exits, or now if
    that process has already exited. A daemon thread waits on a pidfd of `pid`."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)

    def watch() -> None:
        select.select([handle], [], [])  # readable once the process has exited, zombie or reaped
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name=f"die-with-{pid}", daemon=True).start()
