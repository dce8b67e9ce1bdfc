"""`fedstream sim` on a large CSV with the parsed-table cache off, and with it warm.

    python bench/table_cache.py [--rows 300000] [--repeat 3] [--rounds 5]

Writes a CSV of `--rows` rows (ten float features, a label of four classes; 29 MB at the
default), then runs `fedstream sim` on it `--repeat` times each way, alternating:
with `FEDSTREAM_CACHE_DIR=off` (every process parses the file: the driver, then each Ray
worker) and with a cache folder that one untimed run filled first (every process maps
the parsed arrays). It prints the wall time of each run and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_csv(path: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 10))
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + 2 * (x[:, 2] > 0)
    table = np.column_stack([x, y])
    header = ",".join([f"f{i}" for i in range(10)] + ["label"])
    fmt = ["%.6f"] * 10 + ["%d"]
    np.savetxt(path, table, fmt=fmt, delimiter=",", header=header, comments="")


def run_sim(csv: Path, out: Path, rounds: int, cache: str) -> float:
    env = {**os.environ, "FEDSTREAM_CACHE_DIR": cache}
    cmd = [
        sys.executable, "-m", "fedstream.cli.main", "sim", "--quiet", "--out", str(out),
        "--set", "stream.source=csv", "--set", f"stream.path={csv}",
        "--set", "stream.label=label", "--set", f"federation.rounds={rounds}",
    ]
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedstream-cache-bench-") as tmp:
        root = Path(tmp)
        csv = root / "big.csv"
        write_csv(csv, args.rows)
        cache = root / "cache"
        print(f"{args.rows:,} rows, {csv.stat().st_size / 1e6:.1f} MB; filling the cache ...")
        run_sim(csv, root / "out", args.rounds, str(cache))
        times: dict[str, list[float]] = {"off": [], "warm": []}
        for i in range(args.repeat):
            for mode in ("off", "warm") if i % 2 == 0 else ("warm", "off"):
                where = "off" if mode == "off" else str(cache)
                took = run_sim(csv, root / "out", args.rounds, where)
                times[mode].append(took)
                print(f"  run {i + 1} cache {mode:4}: {took:.1f} s", flush=True)
    off, warm = statistics.median(times["off"]), statistics.median(times["warm"])
    print(
        f"median wall time: cache off {off:.1f} s, warm {warm:.1f} s; "
        f"off / warm {off / warm:.2f}x"
    )


if __name__ == "__main__":
    main()
