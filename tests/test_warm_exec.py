"""The warm SuperExec executor: tasks fork from a preloaded zygote, are reaped, and stop.

Real processes throughout: a multiprocessing fork server per test, real forked children,
and for `launch` Flower's own `run_clientapp` (pointed at a Runtime API that is not there).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

from fedstream.client.warm_exec import PRELOAD, ForkExecutor


def report(path: str, code: int) -> None:
    """A trivial task: say where it runs and what it found loaded, exit with `code`."""
    Path(path).write_text(json.dumps({
        "pid": os.getpid(), "ppid": os.getppid(),
        "preloaded": "fedstream.client.spool" in sys.modules,
    }))
    sys.exit(code)


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def torch_step() -> None:
    """Multi-threaded torch, and an optimizer step, in a fork of a zygote that imported it."""
    import torch

    lazy = "torch._dynamo" in sys.modules  # what optimizers import on construction
    torch.set_num_threads(2)
    x = torch.ones(256, 256) @ torch.ones(256, 256)
    w = torch.zeros(4, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=0.5)
    (w - 1.0).pow(2).sum().backward()
    optimizer.step()
    ok = float(x.sum()) == 256.0 ** 3 and torch.allclose(w, torch.ones(4)) and lazy
    sys.exit(0 if ok else 5)


def gone(pid: int, timeout: float = 5.0) -> bool:
    """True once `pid` no longer exists: exited and reaped (a zombie still has /proc/PID)."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def executors():
    made: list[ForkExecutor] = []

    def make(preload: list[str]) -> ForkExecutor:
        executor = ForkExecutor(preload)
        made.append(executor)
        executor.start()
        return executor

    yield make
    for executor in made:
        executor.close()


def test_a_task_forks_from_the_warm_zygote_and_is_reaped(executors, tmp_path: Path) -> None:
    executor = executors(["fedstream.client.spool"])
    assert executor.warm_up(timeout=60)
    zygote = executor.zygote_pid
    out = tmp_path / "child.json"
    proc = executor.fork(report, str(out), 7)
    proc.join(30)
    assert proc.exitcode == 7
    child = json.loads(out.read_text())
    assert child["pid"] not in (os.getpid(), zygote)
    assert child["ppid"] == zygote  # forked by the zygote, not started by this process
    assert child["preloaded"]  # the zygote's imports came with the fork
    assert gone(child["pid"])  # the zygote reaped it: no zombie left
    executor.reconcile()
    assert executor.running == [] and not executor._tasks  # exit codes collected
    assert executor.zygote_pid == zygote  # one zygote serves every task


def test_close_stops_running_tasks_and_the_zygote(executors) -> None:
    executor = executors([])
    procs = [executor.fork(sleep, 60.0) for _ in range(2)]
    pids, zygote = [p.pid for p in procs], executor.zygote_pid
    assert sorted(executor.running) == sorted(pids)
    started = time.monotonic()
    executor.close(grace=1.0)
    assert time.monotonic() - started < 4.0
    assert all(gone(pid) for pid in pids)
    assert zygote is not None and gone(zygote)
    assert executor.zygote_pid is None and executor.running == []
    executor.close()  # again: nothing left to do
    with pytest.raises(RuntimeError):
        executor.fork(sleep, 0.0)


def test_torch_works_in_a_task_forked_from_the_real_zygote(executors) -> None:
    executor = executors(list(PRELOAD))  # flwr, torch, torch._dynamo, the device app
    assert executor.warm_up(timeout=120)
    proc = executor.fork(torch_step)
    proc.join(120)
    assert proc.exitcode == 0
    # The zygote only imported: after a fork it runs no thread besides its own (numpy's
    # OpenBLAS pool, started at import, is shut down around forks), and no process.
    zygote = executor.zygote_pid
    assert len(os.listdir(f"/proc/{zygote}/task")) == 1
    assert Path(f"/proc/{zygote}/task/{zygote}/children").read_text().split() == []


def test_launch_runs_flowers_clientapp_process_in_a_fork(executors) -> None:
    executor = executors(["flwr.supernode.runtime.run_clientapp", "fedstream.client.warm_exec"])
    with socket.socket() as s:  # a Runtime API address where nothing listens
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    spec = ExecutionSpec(
        task_type=TaskType.CLIENT_APP, runtime_api_address=address, token="token",
        insecure=True, root_certificates_path=None, runtime_dependency_install=False,
        parent_pid=os.getpid(), suppress_output=True, task_id=1,
    )
    assert executor.launch(spec).status == LaunchResultStatus.ACCEPTED
    (pid,) = executor.running
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}/comm").read_text().strip() != "flwr-clientapp":
        assert time.monotonic() < deadline, "the task never started Flower's run_clientapp"
        time.sleep(0.05)
    time.sleep(0.5)
    assert executor.running == [pid]  # run_clientapp keeps retrying the Runtime API
    executor.close(grace=1.0)  # SIGTERM (Flower's graceful exit in the task), then SIGKILL
    assert gone(pid)


def test_flowers_loop_still_picks_its_executor_by_the_name_we_rebind() -> None:
    """run_superexec_with rebinds `get_executor` in Flower's SuperExec module: that name must
    still be what `run_superexec` calls (a Flower upgrade that changes it fails here)."""
    import flwr.supercore.superexec.run_superexec as loop

    assert "get_executor" in loop.run_superexec.__code__.co_names
    assert callable(loop.get_executor)


def orphan(watched: int, grace: float) -> None:
    """A task that would run a minute, but ends `grace` s after process `watched` does."""
    from fedstream.client.warm_exec import exit_when_orphaned

    exit_when_orphaned(watched, grace)
    time.sleep(60)


def test_a_task_whose_superexec_died_ends_soon(executors) -> None:
    # A device killed with SIGKILL takes its SuperNode and SuperExec along; Flower's task
    # would keep trying to report to the dead SuperNode for 10 to 30 s, and the zygote
    # lives as long as any child of it does (so it goes once the task has).
    import subprocess

    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    executor = executors(["json"])
    task = executor.fork(orphan, stand_in.pid, 0.5)
    time.sleep(0.5)
    assert task.exitcode is None  # its SuperExec is alive: it runs
    stand_in.kill()
    stand_in.wait()
    started = time.monotonic()
    task.join(10)
    assert task.exitcode == 1 and time.monotonic() - started < 5
