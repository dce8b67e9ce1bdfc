"""Stopping a run from outside the thread its ServerApp runs in.

Flower's simulation engine runs the ServerApp in a thread of its own. On Ctrl-C it stops
its Ray workers but not that thread, which would go on polling for replies that never
come (for up to `round_timeout`) and write rounds into a results folder that a later run
in the same process owns. A stop request makes the thread's next poll raise `RunStopped`,
and no round record is written after it.
"""

from __future__ import annotations

import threading

_stop = threading.Event()
_servers: list[threading.Thread] = []


class RunStopped(Exception):
    """The run was asked to stop (Ctrl-C, or its caller failed)."""


def request() -> None:
    _stop.set()


def requested() -> bool:
    return _stop.is_set()


def check() -> None:
    """Raise `RunStopped` once a stop was requested: called where the ServerApp waits."""
    if _stop.is_set():
        raise RunStopped("the run was stopped")


def serving() -> None:
    """Note the calling thread as a ServerApp that `join` must wait for."""
    _servers.append(threading.current_thread())


def start() -> None:
    """A new run in this process: forget an earlier run's stop (its thread is gone)."""
    _stop.clear()
    _servers.clear()


def join(timeout: float) -> bool:
    """Wait for the ServerApp threads to end; whether they all did."""
    for thread in _servers:
        if thread is not threading.current_thread():
            thread.join(timeout)
    return not any(t.is_alive() for t in _servers)
