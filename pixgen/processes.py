"""Child processes that never outlive the process that started them, or that they work for."""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import os
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


def die_with_starter() -> None:
    """In a child that multiprocessing's forkserver forked on behalf of another process (a
    pipeline's stage, for `pixgen run`): kill it (SIGKILL) as soon as that process exits, or now if
    it already has. Its parent, the forkserver, outlives a killed run while any of its children
    holds the run's pipe, so die_with_parent would not fire; the pipe multiprocessing keeps open
    from the starting process (its `parent_process()` sentinel) closes when that process dies, and a
    daemon thread waits for that."""
    sentinel = multiprocessing.parent_process().sentinel

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-starter", daemon=True).start()
