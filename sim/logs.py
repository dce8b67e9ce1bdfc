"""Keep the terminal for fedstream's own output: Flower and Ray warnings that say nothing
actionable to a fedstream user are dropped; everything else still shows."""

from __future__ import annotations

import logging
import os

_NOISE = (
    "`run_simulation` function is deprecated",
    "fraction_evaluate is set to 0.0",
    # A client taken offline by `simulation.dropout` raises on purpose; Flower logs each
    # one as an error with two tracebacks. fedstream records it as a failure of the round
    # (metrics.jsonl, the summary), so the logs would only bury the output. The engine's
    # generic line before any ClientApp error says nothing the error itself does not.
    "fedstream.sim.availability.ClientUnavailable",
    "An exception was raised when processing a message by",
    # Each Ray actor says so as the engine shuts it down at the end of every run.
    "Manually terminating",
    # Ray starts in the engine's own thread (`sim.runner.run`); the command handles
    # SIGTERM itself, and a script's Ray ends with the run.
    "SIGTERM handler is not set because current thread is not the main thread",
)


class _KnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in _NOISE)


class _EachErrorOnce(logging.Filter):
    """A ClientApp that raises in every client and round (a bad file, a model that does
    not fit the data) gets two tracebacks per message from Flower: hundreds of screens
    for one cause. The first of each error shows; repeats (the same last line) do not.
    Every failure is still in metrics.jsonl and the summary."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        lines = [line for line in record.getMessage().splitlines() if line.strip()]
        last = lines[-1].strip()[:500] if lines else ""
        if last in self.seen:
            return False
        self.seen.add(last)
        return True


def quiet_flower() -> None:
    logger = logging.getLogger("flwr")
    logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _KnownNoise) for f in logger.filters):
        logger.addFilter(_KnownNoise())
        logger.addFilter(_EachErrorOnce())
    ray_worker = logging.getLogger("ray._private.worker")
    if not any(isinstance(f, _KnownNoise) for f in ray_worker.filters):
        ray_worker.addFilter(_KnownNoise())
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
