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
)


class _KnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in _NOISE)


def quiet_flower() -> None:
    logger = logging.getLogger("flwr")
    logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _KnownNoise) for f in logger.filters):
        logger.addFilter(_KnownNoise())
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
