"""Peak memory of `fedstream sim` at 10 and 100 virtual clients (default config otherwise).

    python bench/sim_memory.py [--clients 10 100] [--rounds 5] [--interval 0.2]

A simulation holds one Ray actor per reserved CPU, not one per virtual client: clients take
turns on the actors and their state travels in Flower's Context. So memory should grow with
the number of concurrent workers (2 on a 2-core machine) and hardly with the number of
clients; the ratio of the peaks printed at the end should be near 1.

What is measured: the resident set size (RSS) summed over the whole process family of the
run, sampled every `--interval` seconds from a watcher thread. The family is
  * the launched `fedstream sim` and all its descendants (Ray's gcs_server, raylet,
    dashboard, log monitor, and the raylet's agents and worker processes), plus
  * any process in the launched process's session (it is started with a session of its
    own): Ray workers keep it when they are re-parented to init as the raylet stops, and
    their command line, rewritten to `ray::ClientAppActor`, no longer names the session,
  * any process whose command line names this run's Ray session directory.
RSS counts shared pages (torch's libraries, Ray's object store) once per process that maps
them, so the sum overstates the memory actually used; it is the same measure at every
client count, which is what the ratio needs. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MiB = 1024 * 1024
SESSION_DIR = re.compile(r"/[^\s=]*/session_\d{4}-\d\d-\d\d_[\d_-]+")


def role(proc: psutil.Process, root: int) -> str:
    """A coarse name for the table: driver, client actors, idle workers, or Ray services."""
    if proc.pid == root:
        return "driver"
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "other"
    if "ClientAppActor" in cmd:
        return "client actors"
    if cmd.startswith("ray::IDLE"):
        return "idle Ray workers"
    return "Ray services"


@dataclass
class Family:
    """The processes of one run, found again at every sample (Ray starts them over time)."""

    root: int
    sessions: set[str] = field(default_factory=set)

    def members(self) -> dict[int, psutil.Process]:
        found: dict[int, psutil.Process] = {}
        try:
            top = psutil.Process(self.root)
            for p in [top, *top.children(recursive=True)]:
                found[p.pid] = p
        except psutil.NoSuchProcess:
            pass
        for p in found.values():
            self._learn_session(p)
        for p in psutil.process_iter(["cmdline"]):
            if p.pid not in found and self._belongs(p):
                found[p.pid] = p
        return found

    def _learn_session(self, proc: psutil.Process) -> None:
        with contextlib.suppress(psutil.Error):
            self.sessions.update(SESSION_DIR.findall(" ".join(proc.cmdline())))

    def _belongs(self, proc: psutil.Process) -> bool:
        try:
            if os.getsid(proc.pid) == self.root:
                return True
        except OSError:
            return False
        cmd = " ".join(proc.info.get("cmdline") or [])
        return any(s in cmd for s in self.sessions)


@dataclass
class Peak:
    total: int = 0
    processes: int = 0
    by_role: dict[str, int] = field(default_factory=dict)
    count_by_role: Counter = field(default_factory=Counter)
    role_peaks: Counter = field(default_factory=Counter)  # each role's own peak over time
    samples: int = 0
    pids: set[int] = field(default_factory=set)


class Watcher(threading.Thread):
    """Samples the family's summed RSS until told to stop; keeps the peak and its make-up."""

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.family = Family(root)
        self.interval = interval
        self.peak = Peak()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.interval)
        self.sample()

    def sample(self) -> None:
        by_role: Counter = Counter()
        count: Counter = Counter()
        for pid, proc in self.family.members().items():
            try:
                rss = proc.memory_info().rss
                name = role(proc, self.family.root)
            except psutil.Error:
                continue
            by_role[name] += rss
            count[name] += 1
            self.peak.pids.add(pid)
        total = sum(by_role.values())
        self.peak.samples += 1
        for name, rss in by_role.items():
            self.peak.role_peaks[name] = max(self.peak.role_peaks[name], rss)
        if total > self.peak.total:
            self.peak.total, self.peak.by_role = total, dict(by_role)
            self.peak.count_by_role, self.peak.processes = count, sum(count.values())


def fedstream_command() -> list[str]:
    """The `fedstream` console script of this interpreter's environment (or -m as fallback)."""
    script = Path(sys.executable).with_name("fedstream")
    if script.exists():
        return [str(script)]
    found = shutil.which("fedstream")
    return [found] if found else [sys.executable, "-m", "fedstream.cli.main"]


def measure(clients: int, rounds: int, interval: float, work: Path) -> tuple[Peak, float, int]:
    """Run one simulation under the watcher; returns the peak, the wall time, the exit code."""
    out = work / f"sim-{clients}"
    cmd = [*fedstream_command(), "sim", "-q", "-o", str(out)]
    for key in (f"federation.clients={clients}", f"federation.rounds={rounds}"):
        cmd += ["--set", key]
    cmd += ["--set", "output.plots=false"]
    with open(work / f"sim-{clients}.log", "w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        watcher = Watcher(proc.pid, interval)
        watcher.start()
        code = proc.wait()
        wall = time.perf_counter() - started
        time.sleep(2 * interval)  # let re-parented Ray processes be seen on their way out
        watcher.done.set()
        watcher.join()
    return watcher.peak, wall, code


def print_peak(clients: int, peak: Peak, wall: float, code: int) -> None:
    status = "ok" if code == 0 else f"FAILED (exit {code})"
    print(
        f"\n{clients} clients: peak {peak.total / MiB:.0f} MiB over {peak.processes} processes "
        f"({len(peak.pids)} seen in all, {peak.samples} samples, {wall:.0f} s, {status})"
    )
    for name in sorted(peak.by_role, key=peak.by_role.__getitem__, reverse=True):
        print(
            f"  {name:18} {peak.by_role[name] / MiB:7.0f} MiB in {peak.count_by_role[name]:2} "
            f"at the peak; its own peak {peak.role_peaks[name] / MiB:7.0f} MiB"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    args = p.parse_args()
    print(f"fedstream sim, {args.rounds} rounds, default config otherwise; {os.cpu_count()} cores")
    peaks: dict[int, Peak] = {}
    with tempfile.TemporaryDirectory(prefix="fedstream-mem-") as tmp:
        for n in args.clients:
            peak, wall, code = measure(n, args.rounds, args.interval, Path(tmp))
            print_peak(n, peak, wall, code)
            if code != 0:
                print((Path(tmp) / f"sim-{n}.log").read_text()[-3000:])
            peaks[n] = peak
    lo, hi = min(peaks), max(peaks)
    ratio = peaks[hi].total / peaks[lo].total
    print(
        f"\npeak ratio {hi}/{lo} clients: {ratio:.2f}  (expected near 1: memory follows the "
        f"concurrent Ray workers, {os.cpu_count()} here, not the number of virtual clients)"
    )


if __name__ == "__main__":
    main()
