"""`fedstream server`: Flower's SuperLink plus the fedstream ServerApp, as one command.

The SuperLink runs with TLS, SuperNode authentication and its state in SQLite, all on by
default. The command registers the SuperNode public keys it is given, submits the
deployment app (`fedstream.server.deploy_app`) with the federation config, waits for the
run to finish and keeps its logs. Everything lives in one state directory:

    STATE/superlink.db     Flower's state (nodes, keys, runs)
    STATE/checkpoint.pkl   the last completed round (model, strategy, totals)
    STATE/app/             the Flower App that is submitted (a pyproject naming our apps)
    STATE/logs/            superlink.log, run-<id>.log

Before it starts anything, the command checks that the SuperLink's port is free (and that
`--resume` has a checkpoint to resume); it then only trusts a health reply that comes
from its own SuperLink process, so it never registers keys with, or submits a run to, a
server another command started. On exit it stops the SuperLink and everything the
SuperLink started (its SuperExec and `flwr-serverapp`, which run in a session of their own).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedstream.protocol import runtime
from fedstream.protocol.config import Config, least_clients, to_json
from fedstream.server import checkpoint
from fedstream.server.app import before_run
from fedstream.server.checkpoint import (
    CHECKPOINT,
    changes_on_resume,
    remember_config,
)
from fedstream.server.credentials import CA_CERT, SERVER_CERT, SERVER_KEY, check_certificate
from fedstream.server.deploy_app import RESUME, STATE_DIR

APP_TOML = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedstream-deployment"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "fedstream"

[tool.flwr.app.components]
serverapp = "fedstream.server.deploy_app:app"
clientapp = "fedstream.client.device_app:app"

[tool.flwr.app.config]
fedstream-config = ""
state-dir = ""
resume = false
"""


class PortInUse(ValueError):
    """The SuperLink's port is held by another process (`fedstream server` exits 2)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"port {port} on {host} is in use (another SuperLink?)")


@dataclass(frozen=True)
class Aggregator:
    state: Path
    credentials: Path
    host: str = "127.0.0.1"
    port: int = 9092

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ca(self) -> Path:
        return (self.credentials / CA_CERT).resolve()


def superlink_command(agg: Aggregator) -> list[str]:
    """Flower's SuperLink with TLS, SuperNode authentication and its state in SQLite."""
    for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
        if not (agg.credentials / name).is_file():
            raise FileNotFoundError(
                f"{agg.credentials / name} is missing: make credentials with `fedstream certs`"
            )
    for name in (CA_CERT, SERVER_CERT):
        check_certificate(agg.credentials / name)
    creds = agg.credentials.resolve()
    return [
        "flower-superlink",
        "--ssl-ca-certfile", str(creds / CA_CERT),
        "--ssl-certfile", str(creds / SERVER_CERT),
        "--ssl-keyfile", str(creds / SERVER_KEY),
        "--database", str((agg.state / "superlink.db").resolve()),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", agg.host,
        "--port", str(agg.port),
    ]


def start_superlink(
    agg: Aggregator, env: dict[str, str] | None = None, *, session: bool = False
) -> subprocess.Popen:
    """Start the SuperLink (in `env`, default Flower's runtime env) and wait until healthy.

    Raises `PortInUse` if its port is taken, before starting it or (a race) after: a health
    reply only counts if this SuperLink process is the one listening on the port."""
    command = superlink_command(agg)  # missing credentials: said before anything is made
    if runtime.port_in_use(agg.host, agg.port):
        raise PortInUse(agg.host, agg.port)
    agg.state.mkdir(parents=True, exist_ok=True)
    env = env or runtime.flower_env(agg.state / "flwr-home")
    log = runtime.LogTail(agg.state / "logs" / "superlink.log")
    proc = runtime.spawn(command, env, log.path, agg.state, session=session)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise _exited(agg, log)
        context = ssl.create_default_context(cafile=str(agg.ca))
        url = f"https://127.0.0.1:{agg.port}/health"
        try:
            with urllib.request.urlopen(url, context=context, timeout=1) as reply:
                if reply.status != 200:
                    return False
        except OSError:
            return False
        if runtime.listens_on(proc.pid, agg.port):
            return True
        if proc.poll() is not None:
            raise _exited(agg, log)
        raise PortInUse(agg.host, agg.port)  # someone answered, and it is not our SuperLink

    try:
        runtime.wait_for(healthy, "SuperLink", timeout=60)
    except BaseException:
        runtime.stop_tree(proc)
        raise
    return proc


def _exited(agg: Aggregator, log: runtime.LogTail) -> Exception:
    """Why the SuperLink exited at start-up, from what it logged since it started."""
    text = log.since_mark()
    if "Errno 98" in text or "address already in use" in text.lower():
        return PortInUse(agg.host, agg.port)
    errors = [line.strip() for line in text.splitlines() if "ERROR" in line]
    why = f": {errors[-1]}" if errors else ""
    return RuntimeError(f"the SuperLink exited{why}; see {log.path}")


def control(agg: Aggregator) -> Any:  # Flower's Control API client
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    # Flower's CLI helper prints "Using SuperLink: ..." to stdout, which is the run's here.
    with contextlib.redirect_stdout(io.StringIO()):
        return init_http_client_from_connection(
            SuperLinkConnection(name="fedstream", address=f"127.0.0.1:{agg.port}",
                                root_certificates=str(agg.ca))
        )


def register(ctl: Any, public_keys: list[Path]) -> list[int]:
    """Register SuperNode public keys (OpenSSH lines); keys already known are left alone."""
    from cryptography.hazmat.primitives import serialization
    from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    known = {bytes(n.public_key): n.node_id for n in ctl.ListNodes(ListNodesRequest()).nodes_info}
    ids = []
    for path in public_keys:
        key = public_key_to_bytes(serialization.load_ssh_public_key(path.read_bytes()))
        if key in known:
            ids.append(known[key])
        else:
            request = RegisterNodeRequest(public_key=key, name=path.stem)
            ids.append(ctl.RegisterNode(request).node_id)
    return ids


def registered(ctl: Any, public_keys: list[Path]) -> int:
    """Register the keys; how many devices may then connect (a resumed run's state keeps
    the keys it registered before)."""
    from flwr.proto.control_pb2 import ListNodesRequest

    register(ctl, public_keys)
    nodes = ctl.ListNodes(ListNodesRequest()).nodes_info
    return sum(1 for n in nodes if n.status != "unregistered")


def check_enough_nodes(count: int, need: int, cfg: Config) -> None:
    """A round waits for `need` devices (`least_clients`): with fewer keys registered, the
    run would wait for ever, saying only in its log that too few nodes are connected."""
    if count < need:
        why = ("federation.min_clients" if need == cfg.federation.min_clients else
               "federation.min_clients, and as many as the secure sum's threshold needs")
        raise ValueError(
            f"{count} device key{'s' * (count != 1)} registered, but a round waits for {need} "
            f"devices ({why}): no round could start. Register more (every *.pub in "
            "--credentials, or --node-key KEY.pub for each), or lower federation.min_clients"
        )


def submit(ctl: Any, agg: Aggregator, cfg: Config, resume: bool) -> int:
    """Start the deployment run on the SuperLink; returns its run id."""
    app = agg.state / "app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(APP_TOML)
    overrides = {
        "fedstream-config": to_json(cfg),
        STATE_DIR: str(agg.state.resolve()),
        RESUME: resume,
    }
    return submit_app(ctl, app, overrides)


def submit_app(ctl: Any, app: Path, overrides: dict[str, Any]) -> int:
    """Build the Flower App in `app` into a FAB and start a run of it; returns the run id."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab = build_fab_from_disk(app)
    request = StartRunRequest(
        fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
        override_config=user_config_to_proto(overrides),
        federation="",
    )
    return int(ctl.StartRun(request).run_id)


ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Flower colours its log lines


def wait_run(
    ctl: Any, agg: Aggregator, run_id: int, poll: float = 1.0, lines: RoundLines | None = None,
    need: int = 0,
) -> str:
    """Wait for the run to finish, writing its log as it comes (a server that crashes
    keeps what it logged, and a running one can be read), saying each round's outcome
    (`lines`) and, while fewer than `need` devices are connected, how many are; return
    'completed', 'failed' or 'stopped'."""
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListNodesRequest, ListRunsRequest

    path = agg.state / "logs" / f"run-{run_id}.log"
    done = threading.Event()
    writer = threading.Thread(target=_write_log, args=(ctl, run_id, path, done), daemon=True,
                              name="run-log")
    writer.start()
    started, said = time.monotonic(), need
    try:
        while True:
            run = run_from_proto(ctl.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id])
            if lines is not None:
                lines.say_new()
            if need and time.monotonic() - started > WAIT_QUIET:
                nodes = ctl.ListNodes(ListNodesRequest()).nodes_info
                online = sum(1 for n in nodes if n.status == "online")
                line = waiting_line(online, need, said)
                if line:
                    print(line, file=sys.stderr, flush=True)
                    said = online
            if run.status.status == "finished":
                break
            time.sleep(poll)
        if lines is not None:
            lines.say_new()
        writer.join(timeout=10.0)  # Flower ends the stream once it sent the whole log
    finally:
        done.set()
    return str(run.status.sub_status)


WAIT_QUIET = 10.0  # seconds devices get to connect before the terminal hears of it


def waiting_line(online: int, need: int, said: int) -> str | None:
    """What to tell the operator when the connected devices change (`said`: how many the
    last line counted, `need` at first): too few for a round, or enough again."""
    if online == said or (online >= need and said >= need):
        return None
    if online < need:
        return (f"waiting for devices: {online} of the {need} a round needs are connected "
                "(a device's own terminal says why it is not)")
    return f"{online} devices connected: rounds go on"


class RoundLines:
    """One line per round on the operator's terminal, read from the run's metrics.jsonl as
    the ServerApp writes it: the rounds' outcomes (a round that failed, and why) would
    otherwise be only in files."""

    def __init__(self, metrics: Path, rounds: int) -> None:
        self.path, self.rounds = metrics, rounds
        self.offset = metrics.stat().st_size if metrics.exists() else 0  # a resume's earlier

    def say_new(self) -> None:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return
        done = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self.offset += done
        for raw in data[:done].splitlines():
            with contextlib.suppress(ValueError):
                line = round_line(json.loads(raw), self.rounds)
                if line:
                    print(line, file=sys.stderr, flush=True)


def round_line(rec: dict[str, Any], rounds: int) -> str | None:
    """A round record in a line: who took part, and whether the model moved."""
    if "round" not in rec:
        return None
    head = (f"round {rec['round']}/{rounds}: {rec.get('clients_ok', 0)} of "
            f"{rec.get('clients_sampled', 0)} devices")
    if rec.get("aggregated", True):
        acc = rec.get("accuracy")
        outcome = "aggregated" + (f", accuracy {100 * acc:.1f} %" if acc is not None else "")
    else:
        outcome = f"not aggregated ({rec.get('aggregation_error') or 'no update'})"
    failures = rec.get("failures", [])
    if failures:
        first = failures[0]
        who = f"client {first['client']}" if first.get("client") is not None else "a node"
        outcome += (f"; {len(failures)} failed, first {who}: {first['reason']}")
    return f"{head}, {outcome}, {rec.get('seconds', 0.0):.1f} s"


def _write_log(ctl: Any, run_id: int, path: Path, done: threading.Event) -> None:
    """Append the run's log to `path` as Flower streams it, until the run finishes; a
    stream that breaks (a read timeout in a quiet stretch) is picked up where it was."""
    from flwr.proto.control_pb2 import StreamLogsRequest

    after = 0.0
    with path.open("a") as out:
        while not done.is_set():
            try:
                for chunk in ctl.StreamLogs(StreamLogsRequest(run_id=run_id,
                                                              after_timestamp=after)):
                    out.write(ANSI.sub("", chunk.log_output))
                    out.flush()
                    after = max(after, chunk.latest_timestamp)
                return
            except Exception:  # a log is not worth a crash: try again while the run lasts
                done.wait(1.0)


def stop_previous(ctl: Any, agg: Aggregator) -> None:
    """Stop the run a crashed server left behind, so only the resumed one trains."""
    from flwr.proto.control_pb2 import StopRunRequest

    previous = agg.state / "run-id"
    if previous.exists():
        # Already finished, or unknown to this database: nothing to stop.
        with contextlib.suppress(Exception):
            ctl.StopRun(StopRunRequest(run_id=int(previous.read_text())))


def check_resume(agg: Aggregator) -> None:
    """`--resume` needs a checkpoint in the state directory: refuse to start afresh."""
    if not (agg.state / CHECKPOINT).is_file():
        what = "does not exist" if not agg.state.exists() else f"holds no {CHECKPOINT}"
        raise FileNotFoundError(
            f"--resume: {agg.state} {what}, so there is no checkpoint to resume from "
            "(a mistyped --state? without --resume a fresh run starts)"
        )


def check_same_run(agg: Aggregator, cfg: Config) -> None:
    """`--resume` continues the run it finds: refuse a config that would make it another."""
    changes = changes_on_resume(agg.state, cfg)
    if changes:
        shown = "; ".join(changes)
        raise ValueError(
            f"--resume: the config differs from the run's in {agg.state} ({shown}). A resumed "
            "run may only change federation.rounds (unless privacy.target_epsilon was set), "
            "federation.round_timeout and output settings; give the run's own config (kept in "
            f"{agg.state / 'config.json'}), or start a new run with another --state"
        )


def check_rounds_left(agg: Aggregator, cfg: Config) -> None:
    """`--resume` of a run that has done `federation.rounds` would end at once, having run
    nothing, and write its summary again: say so, and what to give instead. A config whose
    rounds differ from the run's is allowed, and said (a config file without the --set
    the run was started with would quietly make it longer)."""
    ckpt = checkpoint.load(agg.state)
    done = ckpt.server_round if ckpt is not None else 0
    rounds = (checkpoint.run_config(agg.state) or {}).get("federation.rounds", 0)
    if done < cfg.federation.rounds:
        if rounds and rounds != cfg.federation.rounds:
            more = cfg.federation.rounds - done
            print(f"--resume: federation.rounds is {cfg.federation.rounds}, the run was started "
                  f"with {rounds}: {more} more round{'s' * (more != 1)} after the {done} done",
                  file=sys.stderr, flush=True)
        return
    last = f" (it was last started with federation.rounds = {rounds})" if rounds > done else ""
    raise ValueError(
        f"--resume: the run in {agg.state} has done {done} rounds, and federation.rounds is "
        f"{cfg.federation.rounds}: nothing is left to run{last}. To go on, pass --set "
        f"federation.rounds=N with N above {done}"
    )


def check_model(cfg: Config) -> None:
    """The run's model, built once before anything starts: a factory that does not load,
    or gives other than one score per class, would otherwise fail every device's round."""
    from fedstream.server.deploy_app import initial_arrays  # torch and the ServerApp: here

    initial_arrays(cfg, check=True)


def serve(agg: Aggregator, cfg: Config, public_keys: list[Path], resume: bool) -> str:
    """The whole aggregator: SuperLink up, keys registered, run submitted and awaited.

    Stops the SuperLink and every process it started on the way out, however it leaves
    (also `runtime.Stopped` from a signal)."""
    if resume:
        check_resume(agg)
        check_same_run(agg, cfg)
        check_rounds_left(agg, cfg)
    classes = cfg.stream.classes  # the names model.pt gives the model's outputs
    if classes and len(classes) != cfg.stream.n_classes:
        raise ValueError(f"stream.classes names {len(classes)} classes, but the devices' "
                         f"samples have stream.n_classes = {cfg.stream.n_classes}")
    check_model(cfg)
    superlink_command(agg)  # missing credentials: said before the run's plan is printed
    for line in before_run(cfg):  # a target epsilon out of reach raises before anything starts
        print(line, file=sys.stderr)
    lines = RoundLines(Path(cfg.output.dir) / "metrics.jsonl", cfg.federation.rounds)
    link = start_superlink(agg)  # checks credentials and port before it makes anything
    try:
        ctl = control(agg)
        try:
            need = least_clients(cfg.federation, cfg.secure_aggregation)
            check_enough_nodes(registered(ctl, public_keys), need, cfg)
            if resume:
                stop_previous(ctl, agg)
            # A resume keeps its rounds and timeout too, for the next resume to say.
            remember_config(agg.state, cfg)
            run_id = submit(ctl, agg, cfg, resume)
            (agg.state / "run-id").write_text(f"{run_id}\n")
            return wait_run(ctl, agg, run_id, lines=lines, need=need)
        finally:
            ctl.close()
    finally:
        runtime.stop_tree(link)
