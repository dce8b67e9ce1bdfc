"""How often Flower's simulation engine hands queued messages to the virtual clients.

The engine's dispatcher sweeps the message store, then sleeps 0.1 s (hard-coded in flwr
1.41: `vce_api.add_messages_to_queue` calls `f_stop.wait(0.1)`). Every trip of every round
therefore starts on such a tick, and a round of short client work spends much of its time
waiting for one: online training runs many short rounds. fedstream sweeps more often
(`simulation.dispatch_interval`), without letting the dispatcher eat the machine: it
pauses at least four times the CPU time of its last sweep, so it never takes more than a
fifth of a core however many nodes there are, and never longer than Flower would.

A trip need not wait for the next tick either: while the dispatcher pauses, a message
stored for a client (the ServerApp's push, in the same process) ends the pause, so the
sweep that hands it out follows at once, still at most a fifth of a core.

This wraps Flower's own dispatcher, which does the sweeping; only the pause changes. The
wrapper lives for the process, and counts from the moment the engine looks the dispatcher
up: when it starts, after Ray is up.
"""

from __future__ import annotations

import inspect
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

FLOWER_INTERVAL = 0.1  # seconds between sweeps in Flower's engine
ENGINE = "flwr.server.superlink.fleet.vce.vce_api"  # loaded by flwr.simulation
_PARAMETERS = ["state", "queue", "nodes_mapping", "f_stop"]


class _Paced:
    """The engine's stop event as the dispatcher sees it: the same event, shorter pauses,
    ended early by `pushed`."""

    def __init__(self, stop: threading.Event, interval: float, pushed: threading.Event) -> None:
        self._stop, self._interval, self._pushed = stop, interval, pushed
        self._woke = time.thread_time()

    def is_set(self) -> bool:
        return self._stop.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        # The sweep's own CPU time, not its wall time: waiting for the GIL while the
        # clients' messages are pickled is not the dispatcher's cost, and must not slow it.
        least = 4 * (time.thread_time() - self._woke)
        pause = max(self._interval, least)
        if timeout is not None:  # Flower's own pause: never wait longer than Flower would
            pause, least = min(pause, timeout), min(least, timeout)
        began = time.monotonic()
        self._pushed.wait(pause)
        rest = least - (time.monotonic() - began)  # a push never buys more than a fifth
        stopped = self._stop.wait(rest) if rest > 0 else self._stop.is_set()
        self._pushed.clear()  # what was stored before this is in the coming sweep
        self._woke = time.thread_time()
        return stopped


def _wake_on_store(state: Any, pushed: threading.Event) -> Callable[[], None]:
    """Make `state` set `pushed` whenever a message for a client is stored in it; returns
    the undo. (The ServerApp's grid stores through the same state object.)"""
    store = getattr(state, "store_message_ins", None)
    if store is None:
        return lambda: None

    def store_and_wake(message: Any) -> Any:
        try:
            return store(message)
        finally:
            pushed.set()

    try:
        state.store_message_ins = store_and_wake
    except AttributeError:  # a store that takes no attributes: pauses stay as they are
        return lambda: None
    return lambda: vars(state).pop("store_message_ins", None)


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
        pushed = threading.Event()
        undo = _wake_on_store(state, pushed)
        try:
            flowers(state, queue, nodes_mapping, _Paced(f_stop, seconds, pushed))
        finally:
            undo()

    paced.flowers = flowers  # type: ignore[attr-defined]
    vce_api.add_messages_to_queue = paced
    return True


def _flowers(vce_api: Any) -> Any:
    """Flower's dispatcher, also when an earlier call already wrapped it."""
    current = vce_api.add_messages_to_queue
    return getattr(current, "flowers", current)
