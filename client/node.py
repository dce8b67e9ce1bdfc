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

The command runs until it is stopped. Whenever the SuperNode exits (refused, server gone or
replaced, crashed, any exit code) it says why on stderr, from the SuperNode's log, and
starts it again after a pause (2 s, doubling up to 30 s; back to 2 s once it had
connected): ingestion keeps serving all along. `--max-wait S` gives up instead once no
SuperNode has connected for S seconds.

Stopping the command (SIGINT, SIGTERM) stops them all, and it exits 130 or 143; killing it
loses nothing accepted: the spool is on disk, and the next round trains whatever was not
committed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedstream.client.ingest import serve as serve_ingestion
from fedstream.client.spool import Policy, Spool, SpoolError
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
    secure_only: bool = False  # refuse to train in a round without secure aggregation
    private_only: str = ""  # "clip" or "noise": refuse a round that asks less of it
    private_bounds: dict[str, float] = field(default_factory=dict)  # client.privacy.bounds

    @property
    def spool(self) -> Path:
        return self.state / "spool.db"

    @property
    def ingest_address(self) -> str:
        return self.ingest or f"unix://{(self.state / 'ingest.sock').resolve()}"


def supernode_command(dev: Device, runtime_port: int) -> list[str]:
    """Flower's SuperNode; its Runtime API on 127.0.0.1:`runtime_port`."""
    node_config = f"spool='{dev.spool.resolve()}' client-id={dev.client_id}"
    if dev.secure_only:
        node_config += " secure-only=true"  # client.secure.SECURE_ONLY
    if dev.private_only:
        node_config += f" private-only='{dev.private_only}'"  # client.privacy.PRIVATE_ONLY
        node_config += "".join(f" {key}={value!r}" for key, value in dev.private_bounds.items())
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


# What a SuperNode's log says, and what it means for this device (first match wins).
REASONS = (
    # OpenSSL's verify errors: the specific ones first, as every one also says
    # CERTIFICATE_VERIFY_FAILED.
    ("Hostname mismatch",
     "the server's certificate is not for the address this device dials (--server): make "
     "it for that name with `fedstream certs DIR --host NAME` on the server"),
    ("certificate has expired",
     "the server's certificate has expired (or this machine's clock is wrong): make new "
     "credentials with `fedstream certs` on the server"),
    ("certificate is not yet valid",
     "the server's certificate is not valid yet: is this machine's clock right?"),
    ("CERTIFICATE_VERIFY_FAILED",
     "the server's certificate is not signed by the CA given with --ca (another CA?)"),
    ("SuperNode authentication is enabled",
     "the server authenticates devices, and this one has no key: pass --key NAME.key (made "
     "by `fedstream certs DIR --node NAME`; the server registers NAME.pub)"),
    ("401 Unauthorized",
     "the server does not know this device's key (401 Unauthorized): a new or restarted "
     "server that has not registered it"),
    ("Failed to activate SuperNode",
     "the server refused to activate this device's key: it is not registered there "
     "(`fedstream server` registers creds/*.pub or each --node-key, a moment after its "
     "SuperLink starts listening: a device that dialled in that moment connects on its "
     "next try), or a SuperNode with the same key is still connected"),
    ("Unable to parse the private key",
     "--key is not an OpenSSH EC private key"),
    ("Server disconnected without sending a response",
     "the server closed the connection without a reply (--insecure against a TLS server?)"),
    ("Connection reset by peer",  # the same refusal, as gRPC words it under load
     "the server reset the connection (--insecure against a TLS server?, or the server "
     "went down)"),
    ("Giving up reconnection",
     "the server did not answer within --max-wait"),
)
APP_RAISED = "ClientApp raised an exception"  # Flower's words for a round's error, to INFO
CONNECTED = "SuperNode ID:"
RECONNECTED = "Connection successful after"  # Flower's retry, once a server answers again
RETRYING = "Connection attempt failed"
GAVE_UP = "Giving up reconnection"  # Flower's retry at --max-wait-time; its process lives on
# Traffic: a SuperNode that said it lost the server and logs these has it back, whether
# or not Flower logged RECONNECTED (it often does not).
TRAFFIC = ("Received successfully", "Sent successfully")
# A message of a run the server no longer runs (it crashed and restarted): Flower 1.42's
# SuperNode keeps the message and its task anyway, and from then on answers each message
# of the new run one message late, failing every round. Only a new SuperNode forgets it.
STALE_RUN = "status. Ignoring message"
# Without --ca the SuperNode checks the server against this machine's CA store.
NO_CA = ("the server's certificate is not signed by a CA this machine trusts, and no --ca "
         "was given: pass --ca with the federation's ca.crt (made by `fedstream certs`)")
# A device that dials in while a new server is registering keys is refused once or twice:
# said briefly, until it has happened NOT_YET times in a row.
NOT_REGISTERED = "Failed to activate SuperNode"
NOT_YET = 3


LEVEL = re.compile(r"^(?:\x1b\[\d+m)?(DEBUG|INFO|WARNING|ERROR)\s*(?:\x1b\[0m)?\s*:\s*(.*)$")
RAISED = re.compile(r"^[\w.]*(?:Error|Exception)\w*: ")  # a traceback's last line


# A SuperNode that gets 401 Unauthorized (its session unknown to the server) sends itself
# SIGINT and ends "gracefully", 0 or -2, often without logging the 401 at all.
# CPython's own line when a signal lands while its handler is being reset: a process
# that was ending anyway (Flower's SuperNode signals itself on a 401), not a cause.
SHUTDOWN_RACE = "ignored due to race condition"
SHUT_ITSELF = ("the SuperNode shut itself down, as Flower's does when the server no longer "
               "knows its session (401 Unauthorized): a new or restarted server at this "
               "address, or the key was unregistered")


def exit_reason(text: str, code: int | None = None, ca_given: bool = True) -> str:
    """Why a SuperNode exited with `code`, from what it logged during its attempt: the
    meaning of the first known error, then the last few error lines themselves (Flower's
    ERROR blocks and the last line of each traceback)."""
    errors: list[str] = []
    in_error = False  # Flower's ERROR message goes on, unprefixed, to a blank line
    in_round = False  # a round that failed on the device: already said, not why it exited
    for raw in text.splitlines():
        line = raw.strip()
        level = LEVEL.match(line)
        if runtime.ROUND_FAILED in line or APP_RAISED in line:
            in_round = True
        elif level and level[1] == "INFO":
            in_round = False
        if in_round:
            continue
        if level:
            in_error = level[1] == "ERROR"
            if in_error and level[2] and not level[2].startswith("Exit Code"):
                errors.append(level[2])
        elif not line:
            in_error = False
        elif SHUTDOWN_RACE in line:
            continue
        elif (in_error and not line.startswith("The SuperNode could not")) or RAISED.match(line):
            errors.append(line)
    mark, meaning = next(((mark, why) for mark, why in REASONS if mark in text), ("", ""))
    if mark == "CERTIFICATE_VERIFY_FAILED" and not ca_given:
        meaning = NO_CA
    if not meaning and not errors and code in (0, -signal.SIGINT):
        meaning = SHUT_ITSELF
    shown = list(dict.fromkeys(errors))[-3:]
    return "\n".join(filter(None, [meaning, *(f"  {e}" for e in shown)]))


def _reachable(server: str) -> bool:
    """Whether anything accepts a TCP connection at `server` (host:port)."""
    host, _, port = server.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


CLIENT_MARK = "client-id"  # in --state: the client whose samples and learner it holds
STATE_LOCK = ".fedstream.lock"  # in --state: held (flock) by the device running on it, its pid


def hold_state(state: Path) -> int:
    """Hold `state` for this process's life: the returned descriptor keeps the lock, and
    is never closed here.

    Two devices on one state folder would train from one spool and overwrite each other's
    secure-aggregation secrets, failing both every round. The Unix ingestion socket
    catches that only when both listen on it; a lock catches it whatever they listen on,
    and goes with the process however it ends (kill -9 included).
    """
    fd = os.open(state / STATE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl  # POSIX: elsewhere (Windows) the folder is not locked

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        return fd
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SpoolError(
            f"--state {state} is in use by another fedstream client (pid {pid}): one "
            "device runs on a state folder at a time; stop that one, or give this one "
            "its own --state"
        ) from None
    except OSError as err:  # a file system without locks (some NFS or FUSE mounts)
        say(f"note: --state {state} cannot be locked ({err.strerror or err}): a second "
            "device started on it would not be refused")
        return fd
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def claim_state(state: Path, client_id: int) -> None:
    """A state folder is one client's: its spool holds that client's samples, and its
    learner that client's model. Started with another --client-id (two folders swapped),
    the device would train them as the other client's, with nothing said."""
    mark = state / CLIENT_MARK
    try:
        held = int(mark.read_text().strip())
    except FileNotFoundError:
        mark.write_text(f"{client_id}\n")
        return
    except ValueError:
        raise SpoolError(f"{mark}: not a client id; delete it if this state is client "
                         f"{client_id}'s") from None
    if held != client_id:
        raise SpoolError(
            f"--state {state} holds client {held}'s samples and learner, not client "
            f"{client_id}'s: give client {client_id} its own --state, or --client-id {held} "
            f"(to hand this state to client {client_id}, delete {mark})"
        )


@dataclass
class _Watch:
    """What the SuperNodes' log lines have said, and what the device told its terminal of
    them: each reason once, not every retry or round."""

    dev: Device
    log: Path
    since: float = field(default_factory=time.monotonic)  # last connected, for --max-wait
    pause: float = RETRY_FIRST  # before the next SuperNode, after one exits
    refused: int = 0  # attempts in a row the server refused to activate this device's key
    said_waiting: bool = False
    last_failure: str = ""  # why the last round failed here
    noted: set[str] = field(default_factory=set)  # round notes said (their kinds, once each)
    connected: bool = False  # this SuperNode, now
    ever: bool = False  # this SuperNode, at any time
    gave_up: bool = False  # this SuperNode said it gave up reconnecting
    stale: bool = False  # this SuperNode took a message of a run that is over: replace it
    last_reason: str = ""  # why the previous SuperNode exited

    def exited(self, text: str, code: int) -> tuple[str, int | None]:
        """What to say of a SuperNode that exited, having logged `text`; and the command's
        exit code if it is to give up (--max-wait), else None: another is started."""
        dev, log = self.dev, self.log
        reason = exit_reason(text, code, ca_given=dev.ca is not None)
        why = f":\n{reason}\n" if reason else "; "
        self.refused = self.refused + 1 if NOT_REGISTERED in text else 0
        if dev.max_wait and (self.gave_up or time.monotonic() - self.since > dev.max_wait):
            exited = "" if self.gave_up else f" (exit {code})"
            return (f"the SuperNode gave up{exited}{why}not connected for {dev.max_wait:g} s "
                    f"(--max-wait); see {log}", code if code > 0 and not self.gave_up else 1)
        # Refused (not registered yet, server down or replaced, TLS failure), or ended for
        # any other reason: the server may register this key in a moment, and ingestion
        # keeps serving meanwhile. The same reason again is not repeated.
        if 0 < self.refused < NOT_YET:
            why = (": the server has not activated this device's key yet (a new server "
                   "registers keys a moment after it starts; a restarted device waits for "
                   "its old session to lapse; a key the server never registered is named "
                   f"as such after {NOT_YET - 1} refusals); ")
        elif reason and reason == self.last_reason and not self.ever:
            why = " again, for the same reason; "
        # A reason shown only briefly has not been said: the third refusal says it whole.
        self.last_reason = "" if 0 < self.refused < NOT_YET else reason
        return f"the SuperNode exited ({code}){why}retrying in {self.pause:.0f} s; see {log}", None

    def new_node(self) -> None:
        self.connected = self.ever = self.gave_up = self.stale = False

    def hear(self, line: str) -> None:
        dev = self.dev
        back = self.ever and not self.connected and any(t in line for t in TRAFFIC)
        if CONNECTED in line or (RECONNECTED in line and self.ever) or back:
            self.connected = self.ever = True
            self.said_waiting, self.pause, self.refused = False, RETRY_FIRST, 0
            say(f"connected to the server at {dev.server}")
        elif GAVE_UP in line:
            self.gave_up = True
        elif STALE_RUN in line:
            self.stale = True
        elif runtime.ROUND_FAILED in line:
            failure = line.split(runtime.ROUND_FAILED, 1)[1].strip()
            if failure != self.last_failure:
                self.last_failure = failure
                say(f"a round failed on this device: {failure}")
        elif runtime.ROUND_NOTE in line:
            note = line.split(runtime.ROUND_NOTE, 1)[1].strip()
            kind = re.sub(r"\d+", "N", note)  # said once, whatever the round's count
            if kind not in self.noted:
                self.noted.add(kind)
                say(f"a round on this device: {note}")
        elif RETRYING in line and self.connected:  # --max-wait counts from here
            self.connected, self.since, self.said_waiting = False, time.monotonic(), True
            say(f"lost the server at {dev.server}; the SuperNode keeps trying to reach it")
        elif RETRYING in line and not self.said_waiting:  # not connected yet
            self.said_waiting = True
            if not _reachable(dev.server):
                say(f"waiting for the server at {dev.server}: nothing answers there yet")
            else:
                tls = " (it may need TLS: drop --insecure)" if dev.insecure else ""
                say(f"waiting for the server at {dev.server}: it accepts connections but "
                    f"does not answer the SuperNode{tls}; see {self.log}")


def run_device(dev: Device) -> int:
    """Run until the command is stopped (then 128 + the signal: 130, 143), or until no
    SuperNode has connected for `dev.max_wait` seconds (then the last one's exit code, at
    least 1). A SuperNode that exits otherwise, whatever its code, is started again."""
    if not dev.cold and not WARM_POSSIBLE:
        say("no fork server on this platform: running Flower's default SuperExec (--cold)")
        dev = replace(dev, cold=True)
    dev.state.mkdir(parents=True, exist_ok=True)
    hold_state(dev.state)
    claim_state(dev.state, dev.client_id)
    Spool(dev.spool, dev.n_features).close()  # create it, or refuse a mismatched one, now
    ingestion = serve_ingestion(
        str(dev.spool), dev.n_features, dev.ingest_address, dev.capacity, dev.policy,
        n_classes=dev.n_classes,
    )
    env = runtime.flower_env(dev.state / "flwr-home")
    log = dev.state / "logs" / "supernode.log"  # the SuperNode, its SuperExec and tasks
    stopping = threading.Event()
    signals: list[int] = []
    procs: dict[str, subprocess.Popen] = {}  # "node", "exec": what is running now

    def on_signal(signum: int, _frame: object) -> None:
        signals.append(signum)
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

    def stopped() -> int:
        code = runtime.exit_code(signals[0])
        say(f"stopped ({signal.Signals(signals[0]).name}): the SuperNode is stopped; the spool "
            f"keeps everything accepted ({dev.spool})")
        return code

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    tail = runtime.LogTail(log)
    watch = _Watch(dev, log)
    try:
        while True:
            port = runtime.free_port()  # the Runtime API's, fixed for this SuperNode
            tail.mark()
            node = procs["node"] = runtime.spawn(supernode_command(dev, port), env, log,
                                                 dev.state)
            executor = None if dev.cold else start_exec(port, node)
            watch.new_node()
            while node.poll() is None and not stopping.wait(0.2):
                for line in tail.new_lines():
                    watch.hear(line)
                if watch.stale:
                    break
                if watch.connected:
                    watch.since = time.monotonic()
                elif dev.max_wait and (watch.gave_up
                                       or time.monotonic() - watch.since > dev.max_wait + 30):
                    watch.gave_up = True  # Flower's SuperNode said so (and lives on), or hangs
                    break
                if executor is None or executor.poll() is None:
                    continue
                # The SuperExec died under a live SuperNode: no task would run. Start another
                # (after a pause, so a SuperExec that cannot start does not spin).
                if not stopping.wait(RETRY_FIRST) and node.poll() is None:
                    say(f"the warm SuperExec exited ({executor.returncode}), restarting it; "
                        f"see {log}")
                    executor = start_exec(port, node)
            stop_all()  # the SuperExec watches the SuperNode, but do not wait for that
            if stopping.is_set():
                return stopped()
            if watch.stale:
                say("the SuperNode took a message of the server's previous run (the server "
                    "restarted mid-round), which would leave it one message behind in every "
                    f"round: starting a new SuperNode; see {log}")
                if stopping.wait(watch.pause):
                    return stopped()
                watch.pause = min(RETRY_MAX, watch.pause * 2)  # back to RETRY_FIRST on connect
                continue
            tail.new_lines()
            message, give_up = watch.exited(tail.since_mark(), node.returncode)
            say(message)
            if give_up is not None:
                return give_up
            if stopping.wait(watch.pause):
                return stopped()
            watch.pause = min(RETRY_MAX, watch.pause * 2)
    finally:
        stop_all()
        ingestion.stop(grace=2.0).wait()
        ingestion.spool.close()  # type: ignore[attr-defined]
