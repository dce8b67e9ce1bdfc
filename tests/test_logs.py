"""What `fedstream sim` keeps of Flower's log (sim/logs.py), through Flower's own logger."""

from __future__ import annotations

import logging

import pytest
from flwr.common.logger import log

from fedstream.sim.availability import ClientUnavailable
from fedstream.sim.logs import quiet_flower


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def kept():
    logger = logging.getLogger("flwr")
    level, filters = logger.level, list(logger.filters)
    handler = _Kept()
    logger.addHandler(handler)
    quiet_flower()
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)
    logger.filters[:] = filters


def test_planned_dropouts_are_not_logged_but_real_errors_are(kept: list[str]) -> None:
    # As Flower's engine logs a ClientApp that raised: a generic line, the error, and its
    # traceback (here the remote traceback's last line).
    planned = f"{ClientUnavailable.__module__}.ClientUnavailable: client 6 is offline in round 1"
    log(logging.ERROR, "An exception was raised when processing a message by %s", "RayBackend")
    log(logging.ERROR, "ray::ClientAppActor.run() ...\n%s", planned)
    log(logging.ERROR, "Traceback (most recent call last):\n ...\n%s", planned)
    log(logging.ERROR, "Traceback (most recent call last):\n ...\nZeroDivisionError: oops")
    log(logging.INFO, "Starting Flower ServerApp")  # below WARNING: dropped as before
    log(logging.WARNING, "something a user should see")
    assert kept == [
        "Traceback (most recent call last):\n ...\nZeroDivisionError: oops",
        "something a user should see",
    ]


def test_an_error_every_client_raises_is_shown_once(kept: list[str]) -> None:
    # Two actors, two rounds: four tracebacks of one cause (their pids differ), shown once.
    for pid in (11, 12, 11, 12):
        log(logging.ERROR, "ray::ClientAppActor.run() (pid=%d)\n  File x\n"
            "DataError: d.csv: the file changed\n", pid)
    log(logging.ERROR, "ray::ClientAppActor.run() (pid=11)\nValueError: another cause")
    assert len(kept) == 2 and "another cause" in kept[1]
