"""Loading a large CSV: numpy's C parser (files without quotes) against the careful reader.

    python bench/csv_load.py [--rows 1500000] [--repeat 3]

Writes a CSV of `--rows` rows (eight float features and a label of three classes, about
92 MB at the default), and a copy whose header quotes one column name: a '"' anywhere in
a file sends it to the careful, row-by-row reader, which is what every file took before
(and what a file with quoted cells still takes). Each load runs in a subprocess of its own,
alternating, and prints its wall time and how far the load raised the child's peak resident
memory (above what the imports had taken); the ratios
are careful / fast, on the medians. Both loads must give the same table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_csv(path: Path, rows: int, quoted_header: bool) -> None:
    rng = np.random.default_rng(0)
    names = [f"f{i}" for i in range(8)] + ["label"]
    if quoted_header:
        names[0] = f'"{names[0]}"'
    with path.open("w") as out:
        out.write(",".join(names) + "\n")
        for start in range(0, rows, 100_000):
            x = rng.normal(size=(min(100_000, rows - start), 8)).round(4)
            y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 1)
            np.savetxt(out, np.column_stack([x, y]), fmt=["%g"] * 8 + ["%d"], delimiter=",")


def child(path: str) -> None:
    from fedstream.client.sources import load_table

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    started = time.perf_counter()
    table = load_table(path, label="label")
    seconds = time.perf_counter() - started
    digest = hashlib.sha256(table.x.tobytes() + table.y.tobytes()).hexdigest()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "rows": len(table),
                      "digest": digest}))


def load(path: Path) -> dict[str, float | str]:
    done = subprocess.run([sys.executable, __file__, "--child", str(path)], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_500_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child)
        return
    with tempfile.TemporaryDirectory(prefix="fedstream-csv-bench-") as tmp:
        files = {"fast": Path(tmp) / "plain.csv", "careful": Path(tmp) / "quoted.csv"}
        for kind, path in files.items():
            write_csv(path, args.rows, quoted_header=kind == "careful")
        size = files["fast"].stat().st_size / 1e6
        print(f"{args.rows:,} rows, 9 columns, {size:.1f} MB; "
              f"baseline: the careful reader (a quoted header name)")
        runs: dict[str, list[dict]] = {"fast": [], "careful": []}
        for i in range(args.repeat):
            for kind in ("fast", "careful") if i % 2 == 0 else ("careful", "fast"):
                run = load(files[kind])
                runs[kind].append(run)
                print(f"  {kind:8s} {run['seconds']:6.2f} s  peak {run['peak_mb']:6.0f} MB")
        digests = {run["digest"] for kind in runs for run in runs[kind]}
        assert len(digests) == 1, "the two readers gave different tables"
        med = {kind: {key: statistics.median(r[key] for r in runs[kind])
                      for key in ("seconds", "peak_mb")} for kind in runs}
        for kind in ("fast", "careful"):
            print(f"{kind:8s} median {med[kind]['seconds']:6.2f} s, "
                  f"peak {med[kind]['peak_mb']:6.0f} MB")
        print(f"careful / fast: time {med['careful']['seconds'] / med['fast']['seconds']:.2f}x, "
              f"peak memory {med['careful']['peak_mb'] / med['fast']['peak_mb']:.2f}x "
              "(same table from both)")


if __name__ == "__main__":
    main()
