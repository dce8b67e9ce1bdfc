"""`fedstream client`: a device's three parts, as one command.

- the **spool** (`STATE/spool.db`), which keeps what producers sent until it is trained;
- the **ingestion service**, a gRPC endpoint (Unix socket or loopback) producers push to;
- Flower's **SuperNode**, connected to the server over TLS with this device's key. For
  every message it starts a ClientApp process (`fedstream.client.device_app`) that trains
  on the spool and commits the offset with the learner state.

Stopping the command stops all three; killing it loses nothing accepted: the spool is on
disk, and the next round trains whatever was not committed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedstream.client.ingest import serve as serve_ingestion
from fedstream.client.spool import Policy, Spool
from fedstream.protocol import runtime

RETRY_FIRST, RETRY_MAX = 2.0, 30.0  # seconds between SuperNode restarts


@dataclass(frozen=True)
class Device:
    server: str  # host:port of the SuperLink
    state: Path
    client_id: int
    n_features: int
    ca: Path | None = None  # trust this CA; None: the system's
    key: Path | None = None  # SuperNode authentication key (OpenSSH EC private key)
    ingest: str = ""  # unix:///path or 127.0.0.1:PORT; default: STATE/ingest.sock
    capacity: int = 1_000_000
    policy: Policy = "reject"
    insecure: bool = False  # plaintext to the server: only for a SuperLink without TLS
    max_wait: float = 0.0  # give up connecting after this many seconds (0: keep trying)

    @property
    def spool(self) -> Path:
        return self.state / "spool.db"

    @property
    def ingest_address(self) -> str:
        return self.ingest or f"unix://{(self.state / 'ingest.sock').resolve()}"


def supernode_command(dev: Device) -> list[str]:
    node_config = f"spool='{dev.spool.resolve()}' client-id={dev.client_id}"
    cmd = [
        "flower-supernode",
        "--superlink", dev.server,
        "--node-config", node_config,
        "--port", str(runtime.free_port()),
    ]
    if dev.insecure:
        cmd.append("--insecure")
    elif dev.ca is not None:
        cmd += ["--root-certificates", str(dev.ca.resolve())]
    if dev.key is not None:
        cmd += ["--auth-supernode-private-key", str(dev.key.resolve())]
    if dev.max_wait:
        cmd += ["--max-wait-time", str(dev.max_wait)]
    return cmd


def run_device(dev: Device) -> int:
    """Run until the SuperNode exits or the command is stopped; the SuperNode's exit code."""
    dev.state.mkdir(parents=True, exist_ok=True)
    Spool(dev.spool, dev.n_features).close()  # create it, or refuse a mismatched one, now
    ingestion = serve_ingestion(
        str(dev.spool), dev.n_features, dev.ingest_address, dev.capacity, dev.policy
    )
    env = runtime.flower_env(dev.state / "flwr-home")
    log = dev.state / "logs" / "supernode.log"
    stopping = threading.Event()
    node: subprocess.Popen | None = None

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()
        if node is not None:
            runtime.stop(node)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    started, pause = time.monotonic(), RETRY_FIRST
    try:
        while True:
            node = runtime.spawn(supernode_command(dev), env, log, dev.state)
            code = node.wait()
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
        if node is not None:
            runtime.stop(node)
        ingestion.stop(grace=2.0).wait()
