"""How fedstream starts Flower's runtime processes (SuperLink, SuperNode), on either side.

Each process stays in the group of the fedstream command that started it (so a signal to
the command's group reaches it) and, on Linux, is killed the moment that command dies, even
by SIGKILL: a crashed `fedstream server` never leaves a SuperLink running its old run.
Flower's own SuperExec watches its parent in turn. Each runs in its own FLWR_HOME.
Flower's runtime finds `flower-superexec` and `flwr-*app` on PATH: this Python's scripts
come first, so the apps run with the fedstream that started them, and nothing is
installed at run time.

Stopping: `stop_tree` stops a process and everything it started, also what it moved into
sessions of its own (the SuperLink's SuperExec and its `flwr-serverapp`), found by parent
pid. `on_signals` turns SIGINT and SIGTERM into `Stopped`, so a command can stop its
processes and exit 130 or 143 like a shell job.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

PR_SET_PDEATHSIG = 1
ROUND_FAILED = "fedstream: a round failed on this device:"  # device app -> its log -> client
ROUND_NOTE = "fedstream: a round on this device:"  # something the operator should know
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


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process `pid` started, and what they started, whatever their session."""
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def stop_tree(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop every process `proc` started, then `proc`, then anything they left behind.

    What it started goes first: a SuperLink asked to stop waits for its apps' connections
    to close, and its apps keep retrying it, so stopping it first cost its whole grace
    period (then SIGKILL) where its apps end in a few seconds and it at once after them.
    The tree is read while `proc` runs: once it is gone, its children belong to init and
    can no longer be found by parent."""
    _stop_all(descendants(proc.pid) if proc.poll() is None else [], grace)
    late = descendants(proc.pid) if proc.poll() is None else []  # started meanwhile
    stop(proc, grace)
    _stop_all([p for p in late if _running(p)], grace)


def _stop_all(procs: list[psutil.Process], grace: float) -> None:
    """SIGTERM them all at once, then SIGKILL those still running after `grace`; what
    they started in turn (found while they run) goes the same way."""
    left = {p.pid: p for p in procs}
    for p in procs:
        left.update((c.pid, c) for c in descendants(p.pid))
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not left:
            return
        for p in left.values():
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        deadline = time.monotonic() + wait
        while (left := {pid: p for pid, p in left.items() if _running(p)}) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)


def _running(p: psutil.Process) -> bool:
    """Not ended, and not a zombie: a child of another process (the SuperLink's SuperExec)
    stays a zombie until that process reaps it, which it may not do before it ends."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def port_in_use(host: str, port: int) -> bool:
    """Whether a listening socket already holds `host:port` (as the SuperLink's own bind,
    with SO_REUSEADDR, would find it: a port in TIME_WAIT is free)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # not ours to judge: the SuperLink reports the bad address
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` itself holds a listening TCP socket on `port`."""
    with contextlib.suppress(psutil.Error):
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in psutil.Process(pid).net_connections(kind="tcp"))
    return False


class Stopped(BaseException):  # not an Exception: `except Exception` must not catch it
    """Raised by `on_signals` when the command gets SIGINT or SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


def exit_code(signum: int) -> int:
    """A shell's exit status for a command stopped by `signum`: 130 for SIGINT, 143 TERM."""
    return 128 + signum


class StopRequest(threading.Event):
    """Set by the first SIGINT or SIGTERM under `on_signals(soft=...)`: the work in hand
    is to end at its next safe point, rather than be cut off where it stands."""

    signum = 0

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


@contextlib.contextmanager
def on_signals(notice: str = "", soft: StopRequest | None = None) -> Iterator[None]:
    """Within: the first SIGINT or SIGTERM raises `Stopped`; later ones are ignored, so
    they cannot cut the clean-up short. `notice` is printed at once, so that a clean-up
    of a few seconds does not look like a hang. With `soft`, the first signal only sets
    it (printing `notice`) and the second raises. The previous handlers come back on exit."""
    fired = False

    def say() -> None:
        if notice:  # os.write: a print here could re-enter one the signal interrupted
            with contextlib.suppress(OSError):
                os.write(2, f"{notice}\n".encode())

    def handler(signum: int, _frame: object) -> None:
        nonlocal fired
        if soft is not None and not soft.is_set():
            soft.signum = signum
            soft.set()
            say()
        elif not fired:
            fired = True
            if soft is None:
                say()
            raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class LogTail:
    """What a log file gained since a mark: why a process it logs for exited (a SuperLink
    at start-up, a SuperNode), read from its own attempt only, as logs are appended to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mark()

    def mark(self) -> None:
        self.start = self.seen = self.path.stat().st_size if self.path.exists() else 0

    def new_lines(self) -> list[str]:
        """Complete lines written since the last call."""
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.seen)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.seen += end
        return data[:end].decode(errors="replace").splitlines()

    def since_mark(self) -> str:
        if not self.path.exists():
            return ""
        with self.path.open("rb") as f:
            f.seek(self.start)
            return f.read().decode(errors="replace")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], object], what: str, timeout: float, every: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(every)
