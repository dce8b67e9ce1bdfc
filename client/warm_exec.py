"""A warm SuperExec for a device: Flower's SuperExec loop, with ClientApp tasks forked.

Flower's SuperExec (`flower-superexec`, which `flower-supernode` starts in its default
`--isolation subprocess` mode) starts a new `flwr-clientapp` process for every message. That
process spends seconds importing flwr, and more importing torch, before the ClientApp runs;
fedstream's secure rounds take two messages, so a round pays this twice.

Here the SuperNode runs with `--isolation process`, and this module is the SuperExec that
connects to its Runtime API instead (`python -m fedstream.client.warm_exec
--runtime-api-address 127.0.0.1:PORT --insecure --parent-pid SUPERNODE_PID`). It runs
Flower's own SuperExec loop (`run_superexec`: task polling, launch results, signal handling)
with one change, the executor:

- `ForkExecutor` keeps a **zygote**: a multiprocessing fork server that has imported
  Flower's ClientApp runtime, torch and fedstream's device app (`PRELOAD`), and does nothing
  else. The zygote only imports: it never runs torch, so no OpenMP pool exists when it
  forks (numpy's OpenBLAS starts a thread at import, but shuts it down around every fork).
- For every ClientApp task it forks one child from the zygote, which calls Flower's own
  `run_clientapp(...)` with the task's token: each task still runs in a process of its own,
  with fresh state, on exactly Flower's task code path, only without exec and imports.
  The child names itself `flwr-clientapp` (`ps -o comm`, /proc/PID/comm); its command line
  stays the fork server's.
- The zygote reaps its children; the executor collects their exit codes between polls
  (`reconcile`). `close()` stops running tasks (SIGTERM, Flower's graceful exit, then
  SIGKILL) and the zygote. Tasks also watch the SuperExec's pid, as Flower's do.
- Task types other than ClientApp (a SuperNode hands out none) go to Flower's
  `SubprocessExecutor`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import importlib
import multiprocessing
import multiprocessing.util
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from logging import DEBUG, INFO, WARNING
from multiprocessing import forkserver

from flwr.common.args import add_args_runtime_dependency_install
from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import (
    ExecutionSpec,
    Executor,
    LaunchResult,
    SubprocessExecutor,
)

# What the zygote imports: Flower's ClientApp process, torch, and the device's ClientApp
# (with `fedstream.client.app`, which its train handler imports). Tasks fork with them loaded.
# torch._dynamo too: every torch optimizer imports it on construction (with inductor and
# sympy, about 1 s), so each train message would pay for it otherwise. Not this module
# itself: multiprocessing re-runs a `python -m` main module in every child, and runpy warns
# when that module is already imported. What it imports is preloaded, so running its few
# definitions again costs a task a few milliseconds.
PRELOAD = (
    "flwr.supernode.runtime.run_clientapp",
    "flwr.supercore.superexec.executor",
    "torch",
    "torch._dynamo",
    "fedstream.client.device_app",
    "fedstream.client.app",
)
TASK_NAME = b"flwr-clientapp"  # what a forked task calls itself (/proc/PID/comm)
PR_SET_NAME = 15
STOP_GRACE = 2.0  # seconds a task gets to exit after SIGTERM; Flower force-exits at 5 s
ORPHAN_GRACE = 2.0  # seconds a task whose SuperExec died gets for Flower's own exit


def _name_process(name: bytes) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)


def run_task(spec: ExecutionSpec) -> None:
    """In a child forked from the zygote: Flower's ClientApp process for one task."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    _name_process(TASK_NAME)
    if spec.parent_pid is not None:
        exit_when_orphaned(spec.parent_pid, ORPHAN_GRACE)
    if spec.suppress_output:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    run_clientapp(  # ends with flwr_exit: SystemExit with the task's exit code
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        ),
        parent_pid=spec.parent_pid,
        runtime_dependency_install=spec.runtime_dependency_install,
    )


def exit_when_orphaned(pid: int, grace: float) -> threading.Thread:
    """End this process `grace` s after process `pid` (the SuperExec) is gone.

    Flower's task notices its SuperExec's death within 0.2 s, and exits gracefully: it
    keeps trying to report to the SuperNode, which died with it (a device killed with
    SIGKILL), for 10 to 30 s, and holds the zygote alive meanwhile (a forkserver lives as
    long as a child of it does). After `grace` it just ends: its spool writes are
    transactions, so nothing half-done is kept.
    """

    def watch() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                pass  # alive, another user's: pids are not reused that fast
            time.sleep(0.2)
        time.sleep(grace)
        os._exit(1)

    thread = threading.Thread(target=watch, name="orphan-watch", daemon=True)
    thread.start()
    return thread


def _check_preloaded(modules: Sequence[str]) -> None:
    """In a child: exit 0 if the zygote had imported every module, else 3."""
    sys.exit(0 if all(m in sys.modules for m in modules) else 3)


class ForkExecutor:
    """A SuperExec executor (Flower's `Executor` protocol) that forks tasks from a zygote.

    The zygote is the multiprocessing fork server of this process: one per process, started
    by `start()` (or the first fork) and stopped by `close()`.
    """

    def __init__(self, preload: Sequence[str] = PRELOAD) -> None:
        self.preload = list(preload)
        self._context = multiprocessing.get_context("forkserver")
        self._tasks: dict[int, multiprocessing.process.BaseProcess] = {}  # pid -> process
        self._fallback = SubprocessExecutor()
        self._closed = False

    # -- the zygote --------------------------------------------------------------------

    def start(self) -> None:
        """Start the zygote now; it imports `preload` in the background."""
        self._context.set_forkserver_preload(self.preload)
        forkserver.ensure_running()

    @property
    def zygote_pid(self) -> int | None:
        return forkserver._forkserver._forkserver_pid

    def fork(self, target: Callable[..., object], *args: object,
             name: str = "task") -> multiprocessing.process.BaseProcess:
        """Run `target(*args)` in a child forked from the zygote (blocks while it preloads).

        `target` and `args` must pickle; the child's exit code is its SystemExit code.
        Not a daemon: a task may start processes of its own (e.g. data loader workers).
        """
        if self._closed:
            raise RuntimeError("the executor is closed")
        self._context.set_forkserver_preload(self.preload)
        proc = self._context.Process(target=target, args=args, name=name, daemon=False)
        proc.start()
        self._tasks[proc.pid] = proc
        return proc

    def warm_up(self, timeout: float = 300.0) -> bool:
        """Fork one child that checks the preload; True if every module was there."""
        proc = self.fork(_check_preloaded, self.preload, name="warm-up")
        proc.join(timeout)
        ok = proc.exitcode == 0
        if proc.exitcode is None:
            proc.kill()
            proc.join()
        self.reconcile()
        if not ok:
            log(WARNING, "Warm SuperExec: the zygote could not import all of %s; every task "
                "imports what it lacks", self.preload)
        return ok

    @property
    def running(self) -> list[int]:
        """Pids of the tasks not yet collected."""
        return [pid for pid, proc in self._tasks.items() if proc.exitcode is None]

    # -- Flower's Executor protocol ----------------------------------------------------

    def get_eligible_capacity(
        self,
        supported_task_types: set[TaskType],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[TaskType], set[str]]:
        """Every supported task type can launch now (no capacity gate, as Flower's)."""
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(
        self,
        task_type: TaskType | None = None,
        *,
        fab_hash: str | None = None,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> None:
        """Return at once: forks have no capacity gate."""
        del task_type, fab_hash, insecure, root_certificates_path

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Fork the task's process from the zygote (ClientApp), or start it as Flower does."""
        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        try:
            proc = self.fork(run_task, spec, name=f"task-{spec.task_id}")
        except Exception as e:  # the zygote is gone, no fds left, ...
            return LaunchResult.failed(f"could not fork the task from the zygote: {e!r}")
        log(DEBUG, "Warm SuperExec: task %d runs in forked process %d", spec.task_id, proc.pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Collect the exit codes of finished tasks and release their pipes."""
        for pid, proc in list(self._tasks.items()):
            if proc.exitcode is None:
                continue
            if proc.exitcode != 0:
                log(DEBUG, "Warm SuperExec: process %d exited with %d", pid, proc.exitcode)
            proc.join()
            proc.close()
            del self._tasks[pid]

    def close(self, grace: float = STOP_GRACE) -> None:
        """Stop running tasks (SIGTERM, then SIGKILL after `grace`), then the zygote."""
        if self._closed:
            return
        self._closed = True
        live = [p for p in self._tasks.values() if p.exitcode is None]
        for proc in live:
            with contextlib.suppress(OSError):
                proc.terminate()  # Flower's handler in the task: push its status, exit
        deadline = time.monotonic() + grace
        for proc in live:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                with contextlib.suppress(OSError):
                    proc.kill()
                proc.join(1.0)
        self.reconcile()
        self._fallback.close()
        stop_zygote()


def stop_zygote(timeout: float = 1.0) -> None:
    """Stop this process's fork server: close its "alive" pipe, SIGTERM it (it holds only
    imports, nothing to save), reap it, and SIGKILL it if it is not gone in `timeout` s.
    multiprocessing's own `_stop()` waits for it to finish its interpreter's teardown."""
    server = forkserver._forkserver
    with server._lock:
        pid = server._forkserver_pid
        if pid is None:
            return
        with contextlib.suppress(OSError):
            os.close(server._forkserver_alive_fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.005)
        address = server._forkserver_address
        if address and not multiprocessing.util.is_abstract_socket_namespace(address):
            with contextlib.suppress(OSError):
                os.unlink(address)
        server._forkserver_pid = None
        server._forkserver_alive_fd = None
        server._forkserver_address = None


# ---------------------------------------------------------------------- the SuperExec


def run_superexec_with(executor: Executor, **kwargs: object) -> None:
    """Flower's SuperExec loop (`run_superexec`, same arguments), with `executor`.

    Flower chooses the executor inside `run_superexec` by calling the module-level name
    `get_executor(executor_type, ...)`, which knows only "subprocess" and "kubernetes" and
    takes no instance. So, in this process only, that one name in that one module is
    rebound to return our executor: everything else (polling, SuperExec auth, signal
    handling, launch results, `executor.close()` on exit) is Flower's code, unchanged.
    """
    loop = importlib.import_module("flwr.supercore.superexec.run_superexec")
    if "get_executor" not in loop.run_superexec.__code__.co_names:
        raise RuntimeError("this Flower's run_superexec no longer calls get_executor; "
                           "use `fedstream client --cold`")
    loop.get_executor = lambda *_args, **_kwargs: executor  # type: ignore[attr-defined]
    loop.run_superexec(**kwargs)


def _wait_for_runtime_api(address: str, parent_pid: int | None) -> bool:
    """Wait until the SuperNode's Runtime API accepts connections; False if it died."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 1.0):
            return True
        if parent_pid is not None:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
        time.sleep(0.1)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fedstream.client.warm_exec",
        description="Flower's SuperExec for a SuperNode started with --isolation process, "
        "forking every ClientApp task from a preloaded process.",
    )
    ap.add_argument("--runtime-api-address", required=True,
                    help="The SuperNode's Runtime API, HOST:PORT (its --host and --port).")
    ap.add_argument("--insecure", action="store_true",
                    help="Connect to the Runtime API without TLS (a loopback SuperNode).")
    ap.add_argument("--root-certificates", default=None,
                    help="CA certificate of the Runtime API's TLS certificate.")
    ap.add_argument("--parent-pid", type=int, default=None,
                    help="Exit when this process (the SuperNode) exits.")
    ap.add_argument("--preload", default=",".join(PRELOAD),
                    help="Comma-separated modules the zygote imports (default: %(default)s).")
    add_args_runtime_dependency_install(ap)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from flwr.supercore.utils import disable_process_dumping

    args = _parser().parse_args(argv)
    disable_process_dumping(strict=False)  # as flower-superexec: task tokens stay private
    log(INFO, "Starting Flower SuperExec (fedstream warm executor: tasks fork from a "
        "preloaded process)")
    executor = ForkExecutor([m for m in args.preload.split(",") if m])
    try:
        executor.start()  # preloads while the SuperNode starts its Runtime API
        if not _wait_for_runtime_api(args.runtime_api_address, args.parent_pid):
            log(WARNING, "The SuperNode (pid %s) exited before its Runtime API came up",
                args.parent_pid)
            executor.close()
            return 1
        started = time.monotonic()
        executor.warm_up()
        log(INFO, "Warm SuperExec: zygote %s ready (%.1f s after the Runtime API)",
            executor.zygote_pid, time.monotonic() - started)
    except BaseException:
        executor.close()
        raise
    run_superexec_with(
        executor,
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        parent_pid=args.parent_pid,
        runtime_dependency_install=args.runtime_dependency_install,
    )
    return 0


if __name__ == "__main__":
    # Run the importable module's main, so what forked tasks unpickle
    # (`fedstream.client.warm_exec.run_task`) is the module the zygote preloaded.
    from fedstream.client import warm_exec

    sys.exit(warm_exec.main())
