"""Running one benchmark child process and reading its result: shared by the benchmarks.

Each system a benchmark compares runs in a subprocess of its own (`python BENCH --only X`),
so Ray state and memory do not leak from one into the next. The child prints its result as
the last stdout line that is a JSON object; its whole output is kept in a log file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
LOG_DIR = Path(tempfile.gettempdir()) / "fedstream-bench-logs"  # child logs, kept for a look


def run_child(script: str, args: list[str], env: dict[str, str], log_name: str) -> dict[str, Any]:
    """Run `python script *args` with `env` on top of this environment (and bench/ on
    PYTHONPATH); its JSON result, plus `process_seconds` and `log`."""
    full = {**os.environ, **env}
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), full.get("PYTHONPATH")]))
    full.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # as fedstream sets it
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(script).resolve()), *args],
        env=full, capture_output=True, text=True, check=False,
    )
    elapsed = time.perf_counter() - started
    LOG_DIR.mkdir(exist_ok=True)
    log = LOG_DIR / f"{log_name}-{int(time.time() * 1000)}.log"
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    objects = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not objects:
        raise RuntimeError(f"{log_name} run failed (exit {proc.returncode}); log: {log}")
    result = json.loads(objects[-1])
    result["process_seconds"] = elapsed
    result["log"] = str(log)
    return result
