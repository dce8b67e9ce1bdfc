"""How fedstream starts Flower's runtime processes (SuperLink, SuperNode), on either side.

Each process stays in the group of the fedstream command that started it (so a signal to
the command's group reaches it) and, on Linux, is killed the moment that command dies, even
by SIGKILL: a crashed `fedstream server` never leaves a SuperLink running its old run.
Flower's own SuperExec watches its parent in turn. Each runs in its own FLWR_HOME.
Flower's runtime finds `flower-superexec` and `flwr-*app` on PATH: this Python's scripts
come first, so the apps run with the fedstream that started them, and nothing is
installed at run time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
TASK_POLL = "0.05"  # seconds: how often a SuperExec looks for new app processes to start


def flower_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    scripts = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": TASK_POLL,
    }


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it when its parent dies."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent's stop() is the only guard
        pass


def spawn(
    cmd: list[str], env: dict[str, str] | None, log: Path, cwd: Path, *, session: bool = False
) -> subprocess.Popen:
    """Start `cmd` logging to `log`; `session=True` gives it a process group of its own (so
    its whole tree can be signalled at once) instead of the caller's."""
    log.parent.mkdir(parents=True, exist_ok=True)
    linux = sys.platform.startswith("linux")
    return subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=log.open("ab"), stderr=subprocess.STDOUT,
        start_new_session=session,
        preexec_fn=_die_with_parent if linux else None,  # before any thread starts
    )


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process (it stops its own children), then SIGKILL it after `grace`."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(check, what: str, timeout: float, every: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(every)
