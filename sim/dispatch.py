"""How often Flower's simulation engine hands queued messages to the virtual clients.

The engine's dispatcher sweeps the message store, then sleeps 0.1 s (hard-coded in flwr
1.41: `vce_api.add_messages_to_queue` calls `f_stop.wait(0.1)`). Every trip of every round
therefore starts on such a tick, and a round of short client work spends much of its time
waiting for one: online training runs many short rounds. fedstream sweeps more often
(`simulation.dispatch_interval`), without letting the dispatcher eat the machine: it
pauses at least four times the CPU time of its last sweep, so it never takes more than a
fifth of a core however many nodes there are, and never longer than Flower would.

This wraps Flower's own dispatcher, which does the sweeping; only the pause changes. The
wrapper lives for the process, and counts from the moment the engine looks the dispatcher
up: when it starts, after Ray is up.
"""

from __future__ import annotations

import inspect
import sys
import threading
import time
from typing import Any

FLOWER_INTERVAL = 0.1  # seconds between sweeps in Flower's engine
ENGINE = "flwr.server.superlink.fleet.vce.vce_api"  # loaded by flwr.simulation
_PARAMETERS = ["state", "queue", "nodes_mapping", "f_stop"]


class _Paced:
    """The engine's stop event as the dispatcher sees it: the same event, shorter pauses."""

    def __init__(self, stop: threading.Event, interval: float) -> None:
        self._stop, self._interval = stop, interval
        self._woke = time.thread_time()

    def is_set(self) -> bool:
        return self._stop.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        # The sweep's own CPU time, not its wall time: waiting for the GIL while the
        # clients' messages are pickled is not the dispatcher's cost, and must not slow it.
        sweep = time.thread_time() - self._woke
        pause = max(self._interval, 4 * sweep)
        stopped = self._stop.wait(pause if timeout is None else min(pause, timeout))
        self._woke = time.thread_time()
        return stopped


def set_dispatch_interval(seconds: float) -> bool:
    """Make the simulation engine started in this process sweep every `seconds` (at least;
    Flower's 0.1 s at most). Returns False, changing nothing, where this process has no
    simulation engine loaded (a ServerApp under a deployed SuperLink) or this flwr's
    dispatcher is not the one this wraps."""
    if not seconds > 0:
        raise ValueError(f"dispatch interval must be positive, got {seconds}")
    vce_api = sys.modules.get(ENGINE)
    if vce_api is None:
        return False
    flowers = _flowers(vce_api)
    if list(inspect.signature(flowers).parameters) != _PARAMETERS:
        return False
    if seconds >= FLOWER_INTERVAL:
        vce_api.add_messages_to_queue = flowers
        return True

    def paced(state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event) -> None:
        flowers(state, queue, nodes_mapping, _Paced(f_stop, seconds))

    paced.flowers = flowers  # type: ignore[attr-defined]
    vce_api.add_messages_to_queue = paced
    return True


def _flowers(vce_api: Any) -> Any:
    """Flower's dispatcher, also when an earlier call already wrapped it."""
    current = vce_api.add_messages_to_queue
    return getattr(current, "flowers", current)
