"""`fedstream client`: a device's parts, as one command.

- the **spool** (`STATE/spool.db`), which keeps what producers sent until it is trained;
- the **ingestion service**, a gRPC endpoint (Unix socket or loopback) producers push to;
- Flower's **SuperNode**, connected to the server over TLS with this device's key, started
  with `--isolation process`: it serves its Runtime API on 127.0.0.1 and leaves starting
  ClientApp tasks to
- a **warm SuperExec** (`fedstream.client.warm_exec`): Flower's SuperExec loop, whose
  executor forks every ClientApp task (`fedstream.client.device_app`, which trains on the
  spool and commits the offset with the learner state) from a process that has already
  imported flwr, torch and the app. Every message still gets a fresh process running
  Flower's `run_clientapp`, without the seconds of start-up and imports.

`--cold` (`Device.cold`) keeps Flower's default instead: `--isolation subprocess`, where the
SuperNode starts `flower-superexec`, which starts a new `flwr-clientapp` process per message.

Stopping the command stops them all; killing it loses nothing accepted: the spool is on
disk, and the next round trains whatever was not committed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from fedstream.client.ingest import serve as serve_ingestion
from fedstream.client.spool import Policy, Spool
from fedstream.protocol import runtime

# The warm SuperExec forks tasks from a multiprocessing fork server (Linux, macOS).
WARM_POSSIBLE = "forkserver" in multiprocessing.get_all_start_methods()
RETRY_FIRST, RETRY_MAX = 2.0, 30.0  # seconds between SuperNode restarts


@dataclass(frozen=True)
class Device:
    server: str  # host:port of the SuperLink
    state: Path
    client_id: int
    n_features: int
    n_classes: int | None = None  # labels outside [0, n_classes) are refused at ingestion
    ca: Path | None = None  # trust this CA; None: the system's
    key: Path | None = None  # SuperNode authentication key (OpenSSH EC private key)
    ingest: str = ""  # unix:///path or 127.0.0.1:PORT; default: STATE/ingest.sock
    capacity: int = 1_000_000
    policy: Policy = "reject"
    insecure: bool = False  # plaintext to the server: only for a SuperLink without TLS
    max_wait: float = 0.0  # give up connecting after this many seconds (0: keep trying)
    cold: bool = False  # Flower's default isolation: a new flwr-clientapp process per message

    @property
    def spool(self) -> Path:
        return self.state / "spool.db"

    @property
    def ingest_address(self) -> str:
        return self.ingest or f"unix://{(self.state / 'ingest.sock').resolve()}"


def supernode_command(dev: Device, runtime_port: int) -> list[str]:
    """Flower's SuperNode; its Runtime API on 127.0.0.1:`runtime_port`."""
    node_config = f"spool='{dev.spool.resolve()}' client-id={dev.client_id}"
    cmd = [
        "flower-supernode",
        "--superlink", dev.server,
        "--node-config", node_config,
        "--host", "127.0.0.1",
        "--port", str(runtime_port),
    ]
    if not dev.cold:  # the warm SuperExec (superexec_command) runs the ClientApp tasks
        cmd += ["--isolation", "process"]
    if dev.insecure:
        cmd.append("--insecure")
    elif dev.ca is not None:
        cmd += ["--root-certificates", str(dev.ca.resolve())]
    if dev.key is not None:
        cmd += ["--auth-supernode-private-key", str(dev.key.resolve())]
    if dev.max_wait:
        cmd += ["--max-wait-time", str(dev.max_wait)]
    return cmd


def superexec_command(runtime_port: int, supernode_pid: int) -> list[str]:
    """The warm SuperExec for a SuperNode started with `--isolation process`: it connects
    to the SuperNode's Runtime API (plaintext, loopback, as Flower's own SuperExec does)
    and exits with the SuperNode."""
    return [
        sys.executable, "-m", "fedstream.client.warm_exec",
        "--runtime-api-address", f"127.0.0.1:{runtime_port}",
        "--insecure",
        "--parent-pid", str(supernode_pid),
    ]


def run_device(dev: Device) -> int:
    """Run until the SuperNode exits or the command is stopped; the SuperNode's exit code."""
    if not dev.cold and not WARM_POSSIBLE:
        print("no fork server on this platform: running Flower's default SuperExec (--cold)",
              file=sys.stderr)
        dev = replace(dev, cold=True)
    dev.state.mkdir(parents=True, exist_ok=True)
    Spool(dev.spool, dev.n_features).close()  # create it, or refuse a mismatched one, now
    ingestion = serve_ingestion(
        str(dev.spool), dev.n_features, dev.ingest_address, dev.capacity, dev.policy,
        n_classes=dev.n_classes,
    )
    env = runtime.flower_env(dev.state / "flwr-home")
    log = dev.state / "logs" / "supernode.log"  # the SuperNode, its SuperExec and tasks
    stopping = threading.Event()
    procs: dict[str, subprocess.Popen] = {}  # "node", "exec": what is running now

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()  # the loop below wakes within 0.2 s and stops everything in order

    def start_exec(port: int, node: subprocess.Popen) -> subprocess.Popen:
        procs["exec"] = runtime.spawn(superexec_command(port, node.pid), env, log, dev.state)
        return procs["exec"]

    def stop_all() -> None:
        """The SuperExec first (its tasks report to the SuperNode), then the SuperNode."""
        if "exec" in procs:
            executor = procs.pop("exec")
            if "node" in procs and procs["node"].poll() is not None:
                # It watches the SuperNode and is already on its way out: a signal now
                # would only interrupt its clean-up.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    executor.wait(5.0)
            runtime.stop(executor)
        if "node" in procs:
            runtime.stop(procs.pop("node"))

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    started, pause = time.monotonic(), RETRY_FIRST
    try:
        while True:
            port = runtime.free_port()  # the Runtime API's, fixed for this SuperNode
            node = procs["node"] = runtime.spawn(supernode_command(dev, port), env, log,
                                                 dev.state)
            executor = None if dev.cold else start_exec(port, node)
            while node.poll() is None and not stopping.wait(0.2):
                if executor is None or executor.poll() is None:
                    continue
                # The SuperExec died under a live SuperNode: no task would run. Start another
                # (after a pause, so a SuperExec that cannot start does not spin).
                if not stopping.wait(RETRY_FIRST) and node.poll() is None:
                    print(f"the warm SuperExec exited ({executor.returncode}), restarting "
                          f"it; see {log}", file=sys.stderr)
                    executor = start_exec(port, node)
            stop_all()  # the SuperExec watches the SuperNode, but do not wait for that
            code = node.returncode
            # Refused (not registered yet, server down, TLS failure): say so, and try again
            # until --max-wait runs out; the server may register this key in a moment.
            if stopping.is_set() or code == 0:
                return code
            if dev.max_wait and time.monotonic() - started > dev.max_wait:
                print(f"the SuperNode gave up (exit {code}); see {log}", file=sys.stderr)
                return code
            print(f"the SuperNode exited ({code}), retrying in {pause:.0f} s; see {log}",
                  file=sys.stderr)
            if stopping.wait(pause):
                return code
            pause = min(RETRY_MAX, pause * 2)
    finally:
        stop_all()
        ingestion.stop(grace=2.0).wait()
