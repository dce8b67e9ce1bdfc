"""Ingestion throughput: samples of 32 float features through the gRPC service into the spool.

    python bench/ingest.py [--samples 500000] [--features 32] [--batch 8192]
                           [--synchronous full|normal] [--transport unix tcp]

The service runs in a separate process (`python -m fedstream.client.ingest`), as on a
device; this process is the producer (`Producer.append_batches`, one client-streaming call
for all the samples, cycling through a few pre-drawn batches so the producer's own memory
stays flat). For each transport the script prints samples/s, the ratio against the
issue's target (50,000 samples/s) and against the baseline measured in the same run: raw
`Spool.append` in this process, same batches, same pragmas, no gRPC. It also prints the
service process's RSS before the stream, when half the samples are sent, and at the end
(flat memory: the end should be close to the middle), and the spool file's size.

Every sample is stored (the capacity is set to the number of samples). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil

from fedstream.client.ingest import Producer
from fedstream.client.spool import Spool

TARGET = 50_000  # samples/s, from the issue


def draws(batch: int, features: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        (rng.standard_normal((batch, features), dtype=np.float32), rng.integers(0, 10, batch))
        for _ in range(4)
    ]


def baseline(args: argparse.Namespace, folder: Path) -> float:
    spool = Spool(folder / "baseline.db", args.features, capacity=args.samples,
                  synchronous=args.synchronous)
    pool = draws(args.batch, args.features)
    started = time.perf_counter()
    done = 0
    while done < args.samples:
        x, y = pool[(done // args.batch) % len(pool)]
        n = min(args.batch, args.samples - done)
        spool.append(x[:n], y[:n])
        done += n
    seconds = time.perf_counter() - started
    spool.close()
    return args.samples / seconds


def mib(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


def through_service(args: argparse.Namespace, folder: Path, transport: str) -> dict:
    spool_path = folder / f"{transport}.db"
    address = f"unix://{folder}/ingest.sock" if transport == "unix" else "127.0.0.1:0"
    server = subprocess.Popen(
        [
            sys.executable, "-m", "fedstream.client.ingest", "--spool", str(spool_path),
            "--n-features", str(args.features), "--address", address,
            "--capacity", str(args.samples), "--synchronous", args.synchronous,
        ],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("listening on "):
            raise SystemExit(f"the service did not start: {line!r}")
        address = line.removeprefix("listening on ").strip()
        process = psutil.Process(server.pid)
        rss = {"start": mib(process)}
        pool = draws(args.batch, args.features)

        def batches() -> Iterator[tuple[np.ndarray, np.ndarray, None, None]]:
            done = 0
            while done < args.samples:
                if done >= args.samples // 2 and "middle" not in rss:
                    rss["middle"] = mib(process)
                x, y = pool[(done // args.batch) % len(pool)]
                n = min(args.batch, args.samples - done)
                yield x[:n], y[:n], None, None
                done += n

        with Producer(address, batch=args.batch) as producer:
            started = time.perf_counter()
            result = producer.append_batches(batches(), total=args.samples)
            seconds = time.perf_counter() - started
            rss["end"] = mib(process)
            stats = producer.stats()
        if result.accepted != args.samples or stats["pending"] != args.samples:
            raise SystemExit(f"{transport}: not everything was stored: {result} {stats}")
        size = sum(p.stat().st_size for p in folder.glob(f"{transport}.db*"))
        return {"rate": args.samples / seconds, "seconds": seconds, "rss": rss, "bytes": size}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=500_000)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8192, help="samples per message")
    parser.add_argument("--synchronous", choices=("full", "normal"), default="full")
    parser.add_argument("--transport", nargs="+", choices=("unix", "tcp"),
                        default=["unix", "tcp"])
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fsbench", dir="/tmp"))
    try:
        print(f"{args.samples} samples of {args.features} float32 features, batches of "
              f"{args.batch}, synchronous={args.synchronous}, {os.cpu_count()} cores")
        base = baseline(args, folder)
        print(f"baseline  Spool.append in process: {base:10,.0f} samples/s")
        for transport in args.transport:
            got = through_service(args, folder, transport)
            rss = got["rss"]
            print(
                f"{transport:4}      gRPC service -> spool:  {got['rate']:10,.0f} samples/s "
                f"({got['seconds']:.1f} s) = {got['rate'] / TARGET:.2f}x the 50,000/s target, "
                f"{got['rate'] / base:.2f}x the baseline"
            )
            print(
                f"          service RSS: {rss['start']:.0f} MiB at start, "
                f"{rss['middle']:.0f} MiB at half, {rss['end']:.0f} MiB at the end; "
                f"spool on disk {got['bytes'] / 2**20:.0f} MiB"
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
