"""Round latency of a real deployment on loopback: fedstream (secure aggregation) vs stock Flower.

Both federations run on the same runtime, one after the other, as real processes: Flower's
SuperLink with TLS, SuperNode authentication and an sqlite database, three SuperNodes with
their own keys, and the same environment (`fedstream.protocol.runtime.flower_env`, so the
same SuperExec task poll interval). The model is the same 256 -> 384 -> 10 MLP (102,538
parameters) and every client trains 64 samples a round with SGD, batch 4.

- **stock**: a Flower App generated in a temporary directory: a ClientApp that trains on
  64 fixed random samples and replies with ArrayRecord + {"num-examples"}, and a ServerApp
  that runs `flwr.serverapp.strategy.FedAvg(...).start(grid=...)` (no secure aggregation,
  `fraction_evaluate=0`, or Flower's default 1.0 with `--stock-evaluate`). The ServerApp
  wraps the grid to time every `send_and_receive`, and `evaluate_fn` marks round ends.
- **ours**: `fedstream server` and three `fedstream client` commands, as in
  tests/test_deployment.py, with `secure_aggregation.enabled=true`; each device is fed by a
  `Producer` before its first round. Round times and trips come from metrics.jsonl. Each
  device runs its SuperNode with `--isolation process` and fedstream's warm SuperExec
  (`fedstream.client.warm_exec`), which forks every ClientApp task from a process that has
  imported flwr, torch and the app; `--ours-cold` passes `fedstream client --cold` instead
  (Flower's default SuperExec, a new `flwr-clientapp` process per message, as stock).

Rounds 2..N are timed (round 1 starts every process for the first time, and ours fetches
keys in it). The verdict compares the medians against "at most the stock figure".

The profile splits every trip into its stages, from three sources that change neither
system's code:
- a watcher of /proc: every `flwr-clientapp` process (one per message), its start and exit.
  Stock's are started by Flower's SuperExec (exec + imports); ours are forked by the warm
  SuperExec, so their command line is the fork server's: they are found by the name they
  give themselves (/proc/PID/comm `flwr-clientapp`), and their SuperNode by their
  grandparent's `--runtime-api-address`. For ours, "process start" is the fork;
- a tail of each SuperNode's log: when "Receiving", "Received", "Sending" and "Sent
  successfully" appear (the SuperNode logs to stderr, which is line-buffered);
- a `sitecustomize.py` on PYTHONPATH (`--no-trace` turns it off) that, in flwr-clientapp
  processes only (for ours: in the warm SuperExec's fork server, whose patches every forked
  task inherits), times the steps of Flower's `run_clientapp` (its imports, pulling the
  task, loading the app, running it, pushing the reply) and a few fedstream functions
  (importing torch, training, masking, the spool commit).
A trip starts when the stock ServerApp calls `send_and_receive`, or, for ours, when the
last reply of the previous trip was sent (so it includes the server's own work).
Last, it times the imports a ClientApp process does, in fresh interpreters.

    python bench/deploy_latency.py [--rounds 6] [--quick] [--stock-evaluate] [--no-trace]
                                   [--only stock|ours] [--ours-cold] [--keep] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
N_FEATURES, HIDDEN, N_CLASSES, SAMPLES, BATCH, LR = 256, 384, 10, 64, 4, 0.2
NODES = 3
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# ------------------------------------------------------------------------ the stock app

STOCK_TOML = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "stock-latency"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "stock_latency_app:server_app"
clientapp = "stock_latency_app:client_app"

[tool.flwr.app.config]
num-server-rounds = 3
fraction-evaluate = 0.0
timings = ""
"""

STOCK_APP = f'''\
"""Stock Flower FedAvg, written the way Flower's quickstart-pytorch is; plus round timing."""

import json
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

N_FEATURES, HIDDEN, N_CLASSES = {N_FEATURES}, {HIDDEN}, {N_CLASSES}
SAMPLES, BATCH, LR = {SAMPLES}, {BATCH}, {LR}


def new_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(N_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, N_CLASSES)
    )


def load_data(partition_id, server_round):
    rng = np.random.default_rng([partition_id, server_round])
    x = torch.from_numpy(rng.normal(size=(SAMPLES, N_FEATURES)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, N_CLASSES, size=SAMPLES))
    return x, y


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    model = new_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(int(context.node_config["partition-id"]),
                     int(msg.content["config"]["server-round"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    total = 0.0
    for i in range(0, SAMPLES, BATCH):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[i:i + BATCH]), y[i:i + BATCH])
        loss.backward()
        optimizer.step()
        total += loss.item()
    content = RecordDict({{
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({{"train_loss": total / (SAMPLES // BATCH),
                                  "num-examples": SAMPLES}}),
    }})
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = new_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(int(context.node_config["partition-id"]), 0)
    with torch.no_grad():
        out = model(x)
    metrics = {{"eval_loss": float(nn.functional.cross_entropy(out, y)),
               "eval_acc": float((out.argmax(1) == y).float().mean()), "num-examples": SAMPLES}}
    return Message(content=RecordDict({{"metrics": MetricRecord(metrics)}}), reply_to=msg)


class TimedGrid(Grid):
    """The Grid Flower hands the ServerApp, with every send_and_receive timed."""

    def __init__(self, grid, log):
        self._grid, self._log = grid, log

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        started = time.time()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if messages:
            self._log({{"trip": messages[0].metadata.message_type, "start": started,
                       "end": time.time(), "sent": len(messages), "replies": len(replies)}})
        return replies

    @property
    def run(self):
        return self._grid.run

    def set_run(self, run):
        self._grid.set_run(run)

    def create_message(self, *args, **kwargs):
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self):
        return self._grid.get_node_ids()

    def push_messages(self, messages):
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self._grid.pull_messages(message_ids)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    path = str(cfg["timings"])

    def log(rec):
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\\n")

    def evaluate_fn(server_round, arrays):  # Flower calls it before round 1 and after each
        log({{"round_end": server_round, "t": time.time()}})
        return None

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=float(cfg["fraction-evaluate"]),
                      min_train_nodes={NODES}, min_evaluate_nodes={NODES},
                      min_available_nodes={NODES})
    strategy.start(grid=TimedGrid(grid, log), initial_arrays=ArrayRecord(new_model().state_dict()),
                   num_rounds=int(cfg["num-server-rounds"]), evaluate_fn=evaluate_fn)
'''

OURS_TOML = """\
seed = 0
[federation]
clients = {nodes}
min_clients = {nodes}
rounds = {rounds}
round_timeout = 120.0
[stream]
n_features = {features}
n_classes = {classes}
budget = {samples}
[learner]
model = "mlp"
hidden = [{hidden}]
batch_size = {batch}
lr = {lr}
[secure_aggregation]
enabled = true
"""


# A sitecustomize.py put on PYTHONPATH (unless --no-trace): in flwr-clientapp processes only,
# it time-stamps the steps of Flower's run_clientapp by wrapping its module-level functions
# when that module is imported. Nothing in fedstream or the stock app changes. Ours forks its
# tasks from the warm SuperExec's fork server (the zygote), which imports those modules once:
# the tracer installs there, the forked tasks inherit its wrappers, and each writes to its
# own pid's file, with a "site" mark at the fork.
TRACER = r'''
import os
import sys
import time

# Module -> attributes ("func" or "Class.method") whose calls are timed. The first entry is
# Flower's own ClientApp process; the others are fedstream's (absent from the stock app).
SPANS = {
    "flwr.supernode.runtime.run_clientapp": [
        "pull_task_input", "install_from_fab", "push_message", "flwr_exit",
    ],
    "fedstream.client.device_app": ["open_spool"],
    "fedstream.client.app": ["new_learner", "learn"],
    "fedstream.client.secure": ["encode", "_mask_key", "_new_mask_key", "_offer_keys", "_unmask"],
    "fedstream.protocol.secagg": ["mask", "answer"],
    "fedstream.client.spool": ["Spool.pending", "Spool.commit"],
}
IMPORTS = {"torch", "fedstream.client.app", "fedstream.client.device_app"}  # timed imports


def _install():
    try:
        argv = open("/proc/self/cmdline", "rb").read().split(b"\0")
    except OSError:
        return
    zygote = any(b"multiprocessing.forkserver import main" in a
                 and b"fedstream.client.device_app" in a for a in argv)
    if not zygote and not any(a.endswith(b"flwr-clientapp") for a in argv[:2]):
        return
    import importlib.abc
    import importlib.util
    import json

    def write(rec):
        out = os.path.join(os.environ["BENCH_TRACE_DIR"], f"{os.getpid()}.jsonl")
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")

    if zygote:  # its own imports land in its own file, which no message claims
        os.register_at_fork(after_in_child=lambda: write({"mark": "site", "t": time.time()}))
    else:
        write({"mark": "site", "t": time.time()})

    def timed(name, inner, extra=None):
        def wrapper(*args, **kwargs):
            t0 = time.time()
            try:
                value = inner(*args, **kwargs)
            finally:
                write({"span": name, "t0": t0, "t1": time.time()})
            if extra is not None:
                write({"mark": "kind", "kind": extra(value)})
            return value
        return wrapper

    def patch(name, module):
        for attr in SPANS.get(name, []):
            owner, _, leaf = attr.rpartition(".")
            holder = getattr(module, owner) if owner else module
            extra = None
            if attr == "pull_task_input":
                extra = lambda v: str(v[0].metadata.message_type)
            setattr(holder, leaf, timed(attr, getattr(holder, leaf), extra))
        if name == "flwr.supernode.runtime.run_clientapp":
            inner_get = module.get_load_client_app_fn

            def get_load(*args, **kwargs):
                return timed("load ClientApp", inner_get(*args, **kwargs))
            module.get_load_client_app_fn = get_load

    class Finder(importlib.abc.MetaPathFinder):
        busy = set()

        def find_spec(self, name, path, target=None):
            if (name not in SPANS and name not in IMPORTS) or name in self.busy:
                return None
            self.busy.add(name)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                self.busy.discard(name)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            run = spec.loader.exec_module

            def exec_module(module):
                t0 = time.time()
                run(module)
                write({"span": f"import {name}", "t0": t0, "t1": time.time()})
                patch(name, module)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())


_install()
'''

# ---------------------------------------------------------------------------- watchers


def _boot_offset() -> float:
    """time.time() minus seconds since boot, to place /proc start times on the wall clock."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass
class Proc:
    pid: int
    kind: str  # "clientapp" or "supernode"
    port: str  # clientapp: its runtime API port; supernode: the one it serves
    start: float
    last_seen: float
    superlink: str = ""  # supernode only: the SuperLink port
    node_config: str = ""
    forked: bool = False  # clientapp only: forked by fedstream's warm SuperExec
    end: float | None = None  # exited, or a zombie its parent has not reaped yet

    @property
    def stop(self) -> float:
        return self.end if self.end is not None else self.last_seen


class ProcWatch(threading.Thread):
    """Record every flwr-clientapp and flower-supernode process: start (from /proc) and exit."""

    def __init__(self, every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.procs: dict[int, Proc] = {}
        self.ignored: set[int] = set()
        self.stopping = threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")
        self.boot = _boot_offset()

    def run(self) -> None:
        while not self.stopping.wait(self.every):
            self.scan()

    def scan(self) -> None:
        now = time.time()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            if pid in self.procs:
                proc = self.procs[pid]
                if proc.end is None:
                    if proc.kind == "clientapp" and self._zombie(pid):
                        proc.end = now
                    else:
                        proc.last_seen = now
                continue
            if pid in self.ignored:
                continue
            with contextlib.suppress(OSError):
                self._new(pid, now)

    @staticmethod
    def _runtime_port_above(pid: int) -> str | None:
        """The Runtime API port of the nearest ancestor started with --runtime-api-address
        (a forked task's grandparent: the warm SuperExec, above its fork server)."""
        for _ in range(3):
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
            args = [a.decode(errors="replace")
                    for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
            if "--runtime-api-address" in args:
                return args[args.index("--runtime-api-address") + 1].rsplit(":", 1)[-1]
        return None

    @staticmethod
    def _zombie(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
        except OSError:
            return True

    def _new(self, pid: int, now: float) -> None:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        text = [a.decode(errors="replace") for a in args]
        script = next((Path(a).name for a in text[:2] if "flwr-clientapp" in a
                       or "flower-supernode" in a), None)
        stat = Path(f"/proc/{pid}/stat").read_text()
        start = self.boot + int(stat.rsplit(")", 1)[1].split()[19]) / self.tick
        forked_port = None
        if script is None and Path(f"/proc/{pid}/comm").read_text().strip() == "flwr-clientapp":
            forked_port = self._runtime_port_above(pid)  # a task the warm SuperExec forked
        if script is None and forked_port is None:
            # A child shows its parent's command line until it execs, and a forked task
            # until it names itself: look again for 2 s.
            if now - start > 2.0:
                self.ignored.add(pid)
            return
        if forked_port is not None:
            self.procs[pid] = Proc(pid, "clientapp", forked_port, start, now, forked=True)
            return

        def opt(flag: str) -> str:
            return text[text.index(flag) + 1] if flag in text else ""

        if script == "flwr-clientapp":
            port = opt("--runtime-api-address").rsplit(":", 1)[-1]
            self.procs[pid] = Proc(pid, "clientapp", port, start, now)
        else:
            self.procs[pid] = Proc(pid, "supernode", opt("--port"), start, now,
                                   opt("--superlink").rsplit(":", 1)[-1], opt("--node-config"))

    def stop(self) -> None:
        self.stopping.set()
        self.join()


class LogTail(threading.Thread):
    """Time-stamp every line appended to some log files, when it appears (20 ms polls)."""

    def __init__(self, every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.files: dict[str, Path] = {}
        self.offsets: dict[str, int] = {}
        self.partial: dict[str, bytes] = {}
        self.lines: dict[str, list[tuple[float, str]]] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def watch(self, label: str, path: Path) -> None:
        with self.lock:
            self.files[label] = path
            self.offsets.setdefault(label, path.stat().st_size if path.exists() else 0)
            self.lines.setdefault(label, [])
            self.partial.setdefault(label, b"")

    def run(self) -> None:
        while not self.stopping.wait(self.every):
            self.poll()
        self.poll()

    def poll(self) -> None:
        now = time.time()
        with self.lock:
            for label, path in self.files.items():
                try:
                    with path.open("rb") as f:
                        f.seek(self.offsets[label])
                        data = f.read()
                except OSError:
                    continue
                if not data:
                    continue
                self.offsets[label] += len(data)
                data = self.partial[label] + data
                *complete, self.partial[label] = data.split(b"\n")
                for line in complete:
                    text = ANSI.sub("", line.decode(errors="replace")).strip()
                    if text:
                        self.lines[label].append((now, text))

    def stop(self) -> None:
        self.stopping.set()
        self.join()


# ------------------------------------------------------------------------- processes


def spawn(cmd: list[str], env: dict[str, str] | None, log: Path, cwd: Path) -> subprocess.Popen:
    """fedstream's own spawn (killed if this script dies), in a session of its own so that
    `stop_group` stops its whole tree."""
    from fedstream.protocol import runtime

    return runtime.spawn(cmd, env, log, cwd, session=True)


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process's session group, then SIGKILL what is left of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def leftovers(marker: str) -> dict[int, str]:
    """Flower or fedstream processes still running whose command line names `marker`."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if marker in cmd and any(k in cmd for k in ("flwr", "flower", "fedstream")):
                found[int(name)] = cmd
    return found


def clean_up(marker: str) -> None:
    """Give stragglers 3 s to go by themselves (they watch their parent), then SIGKILL them."""
    deadline = time.monotonic() + 3.0
    while (left := leftovers(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid, cmd in left.items():
        print(f"killing leftover process {pid}: {cmd[:160]}", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def cores_busy(seconds: float = 3.0) -> float:
    """How many cores' worth of CPU the whole machine used over `seconds` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0))


def with_pythonpath(env: dict[str, str], *dirs: Path | None) -> dict[str, str]:
    paths = [str(d) for d in dirs if d is not None]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    return {**env, "PYTHONPATH": os.pathsep.join(paths)} if paths else env


# ------------------------------------------------------------------------------ stock


def run_stock(work: Path, name: str, rounds: int, evaluate: bool, tail: LogTail,
              trace: Path | None) -> dict[str, Any]:
    from fedstream.protocol import runtime
    from fedstream.server import aggregator
    from fedstream.server.credentials import CA_CERT

    state, creds = work / name, (work / "creds").resolve()
    app = state / "app"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(STOCK_TOML)
    (app / "stock_latency_app.py").write_text(STOCK_APP)
    timings = state / "timings.jsonl"
    port = runtime.free_port()
    agg = aggregator.Aggregator(state, creds, port=port)

    def env(home: Path) -> dict[str, str]:  # fedstream's runtime env, plus the app's module
        return with_pythonpath(runtime.flower_env(home), trace, app)

    procs: list[subprocess.Popen] = []
    status = "not started"
    try:
        procs.append(aggregator.start_superlink(agg, env(state / "flwr-home"), session=True))
        ctl = aggregator.control(agg)
        try:
            aggregator.register(ctl, [creds / f"n{i}.pub" for i in range(NODES)])
            # The flags of fedstream.client.node.supernode_command, but Flower's default
            # isolation: its own SuperExec starts a flwr-clientapp process per message.
            for i in range(NODES):
                log = state / f"n{i}" / "supernode.log"
                log.parent.mkdir(parents=True)
                tail.watch(f"{name}/n{i}", log)
                node_cmd = [
                    "flower-supernode", "--superlink", f"127.0.0.1:{port}",
                    "--node-config", f"partition-id={i} num-partitions={NODES}",
                    "--port", str(runtime.free_port()),
                    "--root-certificates", str(creds / CA_CERT),
                    "--auth-supernode-private-key", str(creds / f"n{i}.key"),
                ]
                procs.append(spawn(node_cmd, env(state / f"n{i}" / "flwr-home"), log,
                                   state / f"n{i}"))
            runtime.wait_for(lambda: _online(ctl) >= NODES, "3 stock SuperNodes online", 120, 1.0)
            overrides = {"num-server-rounds": rounds, "timings": str(timings),
                         "fraction-evaluate": 1.0 if evaluate else 0.0}
            run_id = aggregator.submit_app(ctl, app, overrides)
            status = aggregator.wait_run(ctl, agg, run_id, poll=0.5)
        finally:
            ctl.close()
    finally:
        for proc in reversed(procs):
            stop_group(proc)
    recs = [json.loads(line) for line in timings.read_text().splitlines()] \
        if timings.exists() else []
    ends = {r["round_end"]: r["t"] for r in recs if "round_end" in r}
    per_round = [ends[r] - ends[r - 1] for r in range(1, rounds + 1) if r in ends and r - 1 in ends]
    trips = [r for r in recs if "trip" in r]
    return {
        "system": "stock", "name": name, "status": status, "port": port, "seconds": per_round,
        "round_trips": [len(trips) // max(1, len(per_round))] * len(per_round),
        "trips": trips, "first_round_messages": 2 if evaluate else 1,
    }


def _online(ctl: Any) -> int:
    from flwr.proto.control_pb2 import ListNodesRequest

    return sum(n.status == "online" for n in ctl.ListNodes(ListNodesRequest()).nodes_info)


# ------------------------------------------------------------------------------- ours


def run_ours(top: Path, name: str, rounds: int, tail: LogTail,
             trace: Path | None, cold: bool = False) -> dict[str, Any]:
    from fedstream.client.ingest import Producer
    from fedstream.protocol import runtime

    work = top / name
    work.mkdir()
    (work / "creds").symlink_to(top / "creds")
    (work / "ours.toml").write_text(OURS_TOML.format(
        nodes=NODES, rounds=rounds, features=N_FEATURES, classes=N_CLASSES, samples=SAMPLES,
        hidden=HIDDEN, batch=BATCH, lr=LR))
    env = with_pythonpath(dict(os.environ), trace)

    def fedstream(*args: str, log: Path) -> subprocess.Popen:  # as tests/test_deployment.py
        return spawn([sys.executable, "-m", "fedstream.cli.main", *args], env, log, work)

    port = runtime.free_port()
    procs = [fedstream("server", "--state", "srv", "--credentials", "creds", "--config",
                       "ours.toml", "--port", str(port), log=work / "server.log")]
    code: int | None = None
    try:
        runtime.wait_for(lambda: (work / "srv" / "run-id").exists(), "fedstream server", 120)
        for i in range(NODES):
            log = work / f"c{i}" / "logs" / "supernode.log"
            log.parent.mkdir(parents=True)
            tail.watch(f"{name}/n{i}", log)
            procs.append(fedstream(
                "client", "--server", f"127.0.0.1:{port}", "--state", f"c{i}", "--client-id",
                str(i), "--config", "ours.toml", "--ca", "creds/ca.crt", "--key",
                f"creds/n{i}.key", *(["--cold"] if cold else []),
                log=work / f"client{i}.log"))
        per_client = SAMPLES * (rounds + 1)  # one round to spare
        for i in range(NODES):
            sock = work / f"c{i}" / "ingest.sock"
            runtime.wait_for(sock.exists, f"client {i}'s ingestion service", 60)
            rng = np.random.default_rng(i)
            x = rng.normal(size=(per_client, N_FEATURES)).astype(np.float32)
            y = rng.integers(0, N_CLASSES, size=per_client)
            with Producer(f"unix://{sock}") as producer:
                accepted = producer.append(x, y).accepted
            if accepted != per_client:
                raise RuntimeError(f"client {i} accepted {accepted} of {per_client} samples")
        code = procs[0].wait(timeout=120 + 120 * rounds)
    finally:
        for proc in reversed(procs):
            stop_group(proc)
    metrics = work / "srv" / "results" / "metrics.jsonl"
    recs = [json.loads(line) for line in metrics.read_text().splitlines()] \
        if metrics.exists() else []
    recs = [r for r in recs if "round" in r]
    return {
        "system": "ours", "name": name, "status": "completed" if code == 0 else f"exit {code}",
        "port": port, "records": recs,
        "seconds": [r["seconds"] for r in recs],
        "round_trips": [r["round_trips"] for r in recs],
        "examples": [r["examples"] for r in recs],
        "failures": sum(len(r["failures"]) for r in recs),
        "first_round_messages": recs[0]["round_trips"] if recs else 3,
    }


# ---------------------------------------------------------------------------- analysis


def summarise(seconds: list[float], keep: list[bool]) -> dict[str, Any]:
    timed = [s for s, k in zip(seconds, keep, strict=True) if k]
    nan = float("nan")
    return {
        "rounds": len(seconds), "timed": len(timed),
        "median": statistics.median(timed) if timed else nan,
        "mean": statistics.fmean(timed) if timed else nan,
        "min": min(timed, default=nan), "max": max(timed, default=nan),
        "round1": seconds[0] if seconds else nan,
    }


RECEIVING = re.compile(r"Receiving: (\w+) message \(ID: (\w+)\)")
SENDING = re.compile(r"Sending: (\w+) message")


def node_events(lines: list[tuple[float, str]]) -> list[dict[str, Any]]:
    """One dict per message a SuperNode handled, with the times its log lines appeared."""
    events: list[dict[str, Any]] = []
    for t, text in lines:
        if m := RECEIVING.search(text):
            events.append({"kind": m.group(1), "receiving": t})
        elif events and "Received successfully" in text:
            events[-1].setdefault("received", t)
        elif events and SENDING.search(text):
            events[-1].setdefault("sending", t)
        elif events and "Sent successfully" in text:
            events[-1].setdefault("sent", t)
    return events


def read_trace(trace: Path | None) -> dict[int, dict[str, Any]]:
    """pid -> the time points of its run_clientapp steps, and its timed spans (seconds)."""
    out: dict[int, dict[str, Any]] = {}
    if trace is None:
        return out
    points = {  # point name: (span, start or end of it)
        "flwr_imported": ("pull_task_input", "t0"), "input_pulled": ("pull_task_input", "t1"),
        "fab_start": ("install_from_fab", "t0"), "fab_installed": ("install_from_fab", "t1"),
        "app_load_start": ("load ClientApp", "t0"), "app_loaded": ("load ClientApp", "t1"),
        "app_done": ("push_message", "t0"), "reply_pushed": ("push_message", "t1"),
        "exit": ("flwr_exit", "t0"),
    }
    for path in (trace / "out").glob("*.jsonl"):
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        first = {}
        spans: dict[str, float] = {}
        info: dict[str, Any] = {}
        for rec in recs:
            if rec.get("mark") == "site":
                info["site"] = rec["t"]
            elif rec.get("mark") == "kind":
                info["traced_kind"] = rec["kind"]
            elif "span" in rec:
                first.setdefault(rec["span"], rec)
                spans[rec["span"]] = spans.get(rec["span"], 0.0) + rec["t1"] - rec["t0"]
        for point, (span, end) in points.items():
            if span in first:
                info[point] = first[span][end]
        info["spans"] = spans
        out[int(path.stem)] = info
    return out


def messages(result: dict[str, Any], tail: LogTail, watch: ProcWatch,
             traces: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every message a SuperNode of this system handled, with all the times known about it."""
    supernodes = [p for p in watch.procs.values()
                  if p.kind == "supernode" and p.superlink == str(result["port"])]
    rows: list[dict[str, Any]] = []
    for i in range(NODES):
        events = node_events(tail.lines.get(f"{result['name']}/n{i}", []))
        key = f"client-id={i}" if result["system"] == "ours" else f"partition-id={i}"
        ports = {p.port for p in supernodes if key in p.node_config}
        procs = sorted((p for p in watch.procs.values()
                        if p.kind == "clientapp" and p.port in ports), key=lambda p: p.start)
        for n, (ev, nxt) in enumerate(zip(events, [*events[1:], None], strict=True)):
            lo, hi = ev["receiving"] - 0.1, (nxt["receiving"] if nxt else float("inf"))
            proc = next((p for p in procs if lo <= p.start < hi), None)
            row = {"node": i, "n": n, **ev}
            if proc is not None:
                row.update(pid=proc.pid, proc_start=proc.start, proc_end=proc.stop,
                           **traces.get(proc.pid, {}))
            rows.append(row)
    return rows


def trips_of(result: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict]:
    """Messages grouped into trips (the n-th message of every node), with the trip's start.

    Stock: the ServerApp timed each send_and_receive. Ours: a trip starts when the last reply
    of the trip before it was sent (so its pull wait includes the server's pull, <= 0.1 s,
    and its work between the trips).
    """
    count = max((r["n"] for r in rows), default=-1) + 1
    trips = []
    for n in range(count):
        msgs = [r for r in rows if r["n"] == n]
        trip: dict[str, Any] = {"n": n, "kind": msgs[0]["kind"], "messages": msgs}
        sent = [r["sent"] for r in msgs if "sent" in r]
        trip["last_sent"] = max(sent) if len(sent) == NODES else float("nan")
        if result["system"] == "stock" and n < len(result["trips"]):
            trip["start"], trip["end"] = result["trips"][n]["start"], result["trips"][n]["end"]
        elif result["system"] == "ours" and trips:
            trip["start"] = trips[-1]["last_sent"]
            trip["end"] = trip["last_sent"]
        trips.append(trip)
    return trips


STAGES = [  # (name, from, to): medians over the messages of one kind
    ("pull wait: trip start -> SuperNode pulls it", "start", "receiving"),
    ("objects pulled (Receiving -> Received)", "receiving", "received"),
    ("Receiving -> flwr-clientapp process starts (ours: forks)", "receiving", "proc_start"),
    ("  python start-up (to sitecustomize; ours: fork)", "proc_start", "site"),
    ("  flwr-clientapp's imports (ours: none, unpickle)", "site", "flwr_imported"),
    ("  pull task input from the SuperNode", "flwr_imported", "input_pulled"),
    ("  install the FAB", "fab_start", "fab_installed"),
    ("  load the ClientApp (import its module)", "app_load_start", "app_loaded"),
    ("  run the ClientApp (handler + mods)", "app_loaded", "app_done"),
    ("  push the reply to the SuperNode", "app_done", "reply_pushed"),
    ("  process start -> reply pushed", "proc_start", "reply_pushed"),
    ("reply pushed -> SuperNode sends it (0.5 s poll)", "reply_pushed", "sending"),
    ("upload (Sending -> Sent)", "sending", "sent"),
    ("whole message: trip start -> reply sent", "start", "sent"),
]


SKIP_SPANS = ("pull_task_input", "install_from_fab", "push_message", "flwr_exit",
              "load ClientApp", "import flwr.supernode.runtime.run_clientapp")  # stages above


def stage_table(trips: list[dict], first: int) -> dict[str, dict[str, float]]:
    """Median seconds of each stage, by message kind, over the trips after round 1."""
    rows = [{**r, "start": t.get("start", float("nan"))} for t in trips[first:]
            for r in t["messages"]]
    out: dict[str, dict[str, float]] = {}
    for kind in sorted({r["kind"] for r in rows}):
        sel = [r for r in rows if r["kind"] == kind]
        stages: dict[str, float] = {"messages": len(sel)}
        for name, a, b in STAGES:
            vals = [r[b] - r[a] for r in sel if a in r and b in r and r[a] == r[a]]
            if vals:
                stages[name] = statistics.median(vals)
        out[kind] = stages
        # Timed calls and imports inside the process, wherever they fell.
        spans = sorted({n for r in sel for n in r.get("spans", {})} - set(SKIP_SPANS))
        for span in spans:  # missing in a message: it took 0 s there
            vals = [r["spans"].get(span, 0.0) for r in sel if "spans" in r]
            stages[f"inside: {span}"] = statistics.median(vals)
    return out


def trip_table(trips: list[dict], first: int) -> dict[str, dict[str, float]]:
    """Per kind of trip after round 1: its span and what bounds it."""
    out: dict[str, dict[str, float]] = {}
    for kind in sorted({t["kind"] for t in trips[first:]}):
        sel = [t for t in trips[first:] if t["kind"] == kind and t.get("start") == t.get("start")
               and "start" in t]
        if not sel:
            continue
        out[kind] = {
            "trips": len(sel),
            "span: start -> last reply sent": statistics.median(
                t["last_sent"] - t["start"] for t in sel),
            "slowest node's pull wait": statistics.median(
                max(m["receiving"] for m in t["messages"]) - t["start"] for t in sel),
            "fastest node's pull wait": statistics.median(
                min(m["receiving"] for m in t["messages"]) - t["start"] for t in sel),
        }
        ends = [t["end"] - t["last_sent"] for t in sel if "end" in t and t["end"] != t["last_sent"]]
        if ends:
            out[kind]["last reply sent -> ServerApp has all replies"] = statistics.median(ends)
    return out


def import_times(repeat: int) -> dict[str, float]:
    """Wall time of a fresh interpreter importing what each ClientApp process imports."""
    sets = {
        "python -c pass": "pass",
        "flwr-clientapp's own imports": "import flwr.supernode.cli.flwr_clientapp",
        "+ the stock app (torch)": "import flwr.supernode.cli.flwr_clientapp, torch",
        "+ fedstream.client.device_app (query messages)":
            "import flwr.supernode.cli.flwr_clientapp, fedstream.client.device_app",
        "+ device_app and fedstream.client.app (train messages)":
            "import flwr.supernode.cli.flwr_clientapp, fedstream.client.device_app, "
            "fedstream.client.app",
    }
    out = {}
    for name, code in sets.items():
        runs = []
        for _ in range(repeat):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
            runs.append(time.perf_counter() - t)
        out[name] = statistics.median(runs)
    return out


def importtime_top(module: str, after: str = "", n: int = 6) -> list[tuple[str, float]]:
    """`python -X importtime`: what `import module` costs (cumulative s) after `import after`,
    then its heaviest direct imports."""
    code = (f"import {after}; " if after else "") + f"import {module}"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    children: list[tuple[str, float]] = []  # direct imports since the last top-level one
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        indent = len(parts[2]) - len(parts[2].lstrip())
        name, seconds = parts[2].strip(), int(parts[1]) / 1e6
        if indent == 3:
            children.append((name, seconds))
        elif indent == 1:
            if name == module:  # the tree is printed children first
                return [(name, seconds), *sorted(children, key=lambda c: -c[1])[:n]]
            children = []
    return [(module, 0.0)]  # already imported by `after`


# ------------------------------------------------------------------------------- main


def fmt(x: float) -> str:
    return "-" if x != x else f"{x:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each system this many times, alternating which goes first")
    ap.add_argument("--quick", action="store_true", help="3 rounds, one import timing each")
    ap.add_argument("--stock-evaluate", action="store_true",
                    help="stock FedAvg with Flower's default fraction_evaluate=1.0 "
                         "(an evaluate trip every round)")
    ap.add_argument("--only", choices=["stock", "ours"], default=None)
    ap.add_argument("--ours-cold", action="store_true",
                    help="ours with `fedstream client --cold`: Flower's default SuperExec "
                         "(a new flwr-clientapp process per message) instead of the warm one")
    ap.add_argument("--no-trace", action="store_true",
                    help="no sitecustomize time stamps in the flwr-clientapp processes")
    ap.add_argument("--skip-imports", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", type=Path, default=None, help="write all figures here")
    args = ap.parse_args()
    rounds = 3 if args.quick else args.rounds
    if rounds < 2:
        ap.error("--rounds must be at least 2 (round 1 is not timed)")

    from fedstream.server.credentials import make_credentials

    work = Path(tempfile.mkdtemp(prefix="fdl", dir="/tmp"))  # short: Unix socket paths
    make_credentials(work / "creds", nodes=[f"n{i}" for i in range(NODES)])
    trace = None
    if not args.no_trace:
        trace = work / "trace"
        (trace / "out").mkdir(parents=True)
        (trace / "sitecustomize.py").write_text(TRACER)
        os.environ["BENCH_TRACE_DIR"] = str(trace / "out")
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so every process group gets stopped.
    def on_term(*_: object) -> None:
        print("\nSIGTERM: stopping every process group", file=sys.stderr, flush=True)
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_term)
    systems = [args.only] if args.only else ["stock", "ours"]
    plan = [(system, f"{system}{rep}") for rep in range(args.repeat)
            for system in (systems if rep % 2 == 0 else systems[::-1])]
    watch, tail = ProcWatch(), LogTail()
    watch.start()
    tail.start()
    runs: list[dict[str, Any]] = []
    busy_before = cores_busy()
    print(f"work directory: {work}; before the runs {busy_before:.2f} of {os.cpu_count()} cores "
          f"were busy", flush=True)
    try:
        for system, name in plan:
            started = time.monotonic()
            if system == "stock":
                print(f"{name}: stock Flower FedAvg, {rounds} rounds ...", end=" ", flush=True)
                runs.append(run_stock(work, name, rounds, args.stock_evaluate, tail, trace))
            else:
                print(f"{name}: fedstream with secure aggregation, {rounds} rounds ...", end=" ",
                      flush=True)
                runs.append(run_ours(work, name, rounds, tail, trace, args.ours_cold))
            print(f"{runs[-1]['status']} in {time.monotonic() - started:.0f} s", flush=True)
    finally:
        time.sleep(0.2)
        watch.stop()
        tail.stop()
        clean_up(str(work))
    busy_after = cores_busy()
    report: dict[str, Any] = {"rounds": rounds, "repeat": args.repeat,
                              "stock_evaluate": args.stock_evaluate,
                              "cores_busy_before_after": [busy_before, busy_after]}
    print()
    print(f"Round latency on loopback: {NODES} SuperNodes, MLP {N_FEATURES}-{HIDDEN}-{N_CLASSES} "
          f"(102,538 parameters), {SAMPLES} samples per client per round, TLS + SuperNode auth")
    print("(timed: rounds 2..N of every run; for ours also only rounds without a keys trip)")
    print()
    header = ("system", "runs", "rounds", "timed", "median s", "mean s", "min s", "max s",
              "round 1 s", "trips/round")
    table = []
    for key, label in (("stock", "stock FedAvg" + (" +evaluate" if args.stock_evaluate else "")),
                       ("ours", "fedstream, secure agg." + (" (cold)" if args.ours_cold
                                                             else " (warm SuperExec)"))):
        mine = [r for r in runs if r["system"] == key]
        if not mine:
            continue
        seconds, keep, trips_all = [], [], []
        for res in mine:
            seconds += res["seconds"]
            keep += [i > 0 and (key == "stock" or t <= 2) for i, t in enumerate(res["round_trips"])]
            trips_all += res["round_trips"]
        s = summarise(seconds, keep)
        s["round1"] = statistics.median(r["seconds"][0] for r in mine if r["seconds"]) \
            if any(r["seconds"] for r in mine) else float("nan")
        timed_trips = sorted({t for t, k in zip(trips_all, keep, strict=True) if k})
        trips = "/".join(map(str, timed_trips)) or "-"
        first = {r["round_trips"][0] for r in mine if r["round_trips"]}
        if first - set(timed_trips):
            trips += f" (round 1: {'/'.join(map(str, sorted(first)))})"
        statuses = sorted({r["status"] for r in mine})
        report[key] = {**s, "status": statuses, "seconds": [r["seconds"] for r in mine],
                       "round_trips": [r["round_trips"] for r in mine]}
        table.append((label, f"{len(mine)} {','.join(statuses)}", s["rounds"], s["timed"],
                      fmt(s["median"]), fmt(s["mean"]), fmt(s["min"]), fmt(s["max"]),
                      fmt(s["round1"]), trips))
    widths = [max(len(str(r[i])) for r in [header, *table]) for i in range(len(header))]
    for r in [header, *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print()
    for res in runs:
        extra = ""
        if res["system"] == "ours":
            extra = f" (examples {res['examples']}, client failures {res['failures']})"
        print(f"{res['name']} seconds per round: " + ", ".join(fmt(x) for x in res["seconds"])
              + extra)
    print(f"other load: {busy_before:.2f} cores busy before the runs, {busy_after:.2f} after")
    if max(busy_before, busy_after) > 0.3:
        print("warning: something else was using the CPU: every figure is inflated")
    if "stock" in report and "ours" in report:
        med = report["ours"]["median"] / report["stock"]["median"]
        mean = report["ours"]["mean"] / report["stock"]["mean"]
        verdict = "MET" if med <= 1.0 else "NOT MET"
        report.update(ratio_median=med, ratio_mean=mean, verdict=verdict)
        print(f"\nratio ours/stock, rounds 2..N: median {med:.2f}, mean {mean:.2f}")
        print(f"target 'at most the stock figure' (median ratio <= 1.00): {verdict}")

    # --- profile ------------------------------------------------------------------------
    traces = read_trace(trace)
    for key in ("stock", "ours"):
        all_trips: list[dict] = []
        for res in (r for r in runs if r["system"] == key):
            trips = trips_of(res, messages(res, tail, watch, traces))
            all_trips += trips[res["first_round_messages"]:]  # rounds 2..N
        if not all_trips:
            continue
        stages, spans = stage_table(all_trips, 0), trip_table(all_trips, 0)
        report.setdefault("profile", {})[key] = {
            "stages": stages, "trips": spans,
            "messages": [m for t in all_trips for m in t["messages"]]}
        print(f"\nprofile, {key}: trips of rounds 2..N (median seconds)")
        pids = [m["pid"] for t in all_trips for m in t["messages"] if "pid" in m]
        forked = sum(watch.procs[pid].forked for pid in pids)
        report["profile"][key]["forked_processes"] = [forked, len(pids)]
        if forked:
            print(f"  ({forked} of the {len(pids)} ClientApp processes found were forked by the "
                  "warm SuperExec: 'process starts' is the fork, and they import nothing)")
        for kind, vals in spans.items():
            print(f"  {kind} trips ({vals['trips']}): " + "; ".join(
                f"{name} {v:.2f}" for name, v in vals.items() if name != "trips"))
        for kind, vals in stages.items():
            print(f"  per {kind} message ({vals['messages']}):")
            inside = {k.removeprefix("inside: "): v for k, v in vals.items()
                      if k.startswith("inside: ") and v >= 0.005}
            for name, v in vals.items():
                if name != "messages" and not name.startswith("inside: "):
                    print(f"    {name:<58} {v:6.2f}")
            if inside:
                print("    timed inside the process (>= 5 ms): " + ", ".join(
                    f"{name} {v:.2f}" for name, v in inside.items()))
    if not args.skip_imports:
        repeat = 1 if args.quick else 3
        print(f"\nImports of a fresh interpreter (what a ClientApp process loads), "
              f"median of {repeat}, seconds:")
        if "ours" in systems and not args.ours_cold:
            print("  (stock pays them in every message; ours once per device, when its warm "
                  "SuperExec starts)")
        imports = import_times(repeat)
        report["imports"] = imports
        for name, v in imports.items():
            print(f"    {name:<56} {v:6.2f}")
        flwr_app = "flwr.supernode.cli.flwr_clientapp"
        for module, after in ((flwr_app, ""), ("fedstream.client.device_app", flwr_app),
                              ("fedstream.client.app", flwr_app), ("torch", flwr_app)):
            top = importtime_top(module, after=after)
            report.setdefault("importtime", {})[module] = top
            print(f"  -X importtime{', after flwr-clientapp' if after else ''}: `import {module}` "
                  f"{top[0][1]:.2f} s; heaviest direct imports: "
                  + ", ".join(f"{n} {v:.2f}" for n, v in top[1:]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    if args.keep:
        print(f"\nkept {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
