"""The simulation engine's dispatch interval (sim/dispatch.py), on Flower's own dispatcher.

Flower's `add_messages_to_queue` runs here for real, in a thread, against a message store
that records when it is swept: the wrapper must make it sweep more often than Flower's
pause allows, back off when sweeps are slow, stop when the engine stops, and step aside at
Flower's interval. Only bounds that a busy machine cannot break are checked: a pause is
never shorter than asked, and a count of sweeps above what 0.1 s pauses permit.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
from queue import Queue

import pytest
from flwr.server.superlink.fleet.vce import vce_api

from fedstream.sim import dispatch


class SweptStore:
    """A message store with no messages that notes every sweep (one call per node), and
    can make each call cost CPU time."""

    def __init__(self, nodes: int, cpu_seconds_per_call: float = 0.0) -> None:
        self.nodes, self.cpu_seconds_per_call = nodes, cpu_seconds_per_call
        self.calls: list[float] = []

    def get_message_ins(self, node_id: int, limit: int) -> list:
        assert limit == 1
        self.calls.append(time.perf_counter())
        spent = time.thread_time() + self.cpu_seconds_per_call
        while time.thread_time() < spent:
            pass
        return []

    def store_message_ins(self, message: object) -> str:
        """Where the ServerApp's grid stores a message for a client (the wrapper hooks it)."""
        return "stored"

    def sweep_gaps(self) -> list[float]:
        starts = self.calls[:: self.nodes]
        return [b - a for a, b in itertools.pairwise(starts)]


def _run_dispatcher(store: SweptStore, seconds: float, push_every: float | None = None) -> None:
    stop = threading.Event()
    thread = threading.Thread(
        target=vce_api.add_messages_to_queue,
        args=(store, Queue(), dict.fromkeys(range(store.nodes), 0), stop),
    )
    thread.start()
    end = time.perf_counter() + seconds
    while (now := time.perf_counter()) < end:
        time.sleep(min(push_every or seconds, end - now))
        if push_every is not None:
            store.store_message_ins(object())  # as the ServerApp's push does
    stop.set()
    thread.join(timeout=2)
    assert not thread.is_alive(), "the dispatcher did not stop with the engine"


@pytest.fixture(autouse=True)
def _flowers_dispatcher_after():
    yield
    dispatch.set_dispatch_interval(dispatch.FLOWER_INTERVAL)


def test_flowers_dispatcher_sweeps_every_tenth_of_a_second() -> None:
    # The premise: what the wrapper changes is really there.
    assert dispatch.set_dispatch_interval(dispatch.FLOWER_INTERVAL)
    store = SweptStore(nodes=3)
    _run_dispatcher(store, 0.45)
    assert 1 <= len(store.sweep_gaps()) <= 4
    assert min(store.sweep_gaps()) > 0.09


def test_a_short_interval_makes_flowers_dispatcher_sweep_that_often() -> None:
    assert dispatch.set_dispatch_interval(0.01)
    store = SweptStore(nodes=3)
    _run_dispatcher(store, 0.45)
    gaps = store.sweep_gaps()
    assert len(gaps) >= 8  # more than Flower's pauses allow in 0.45 s (4), even on a busy box
    assert min(gaps) >= 0.009


def test_costly_sweeps_are_paced_to_a_fifth_of_a_core() -> None:
    # 4 nodes at 5 ms of CPU each: a 20 ms sweep, so at least 80 ms of pause after it.
    assert dispatch.set_dispatch_interval(0.01)
    store = SweptStore(nodes=4, cpu_seconds_per_call=0.005)
    _run_dispatcher(store, 0.6)
    gaps = store.sweep_gaps()
    assert gaps and min(gaps) >= 0.09  # sweep + 4 x sweep


@pytest.mark.parametrize("seconds", [0.0, -0.01, float("nan")])
def test_a_non_positive_interval_is_refused(seconds: float) -> None:
    with pytest.raises(ValueError, match="dispatch interval must be positive"):
        dispatch.set_dispatch_interval(seconds)


def test_setting_it_again_wraps_flowers_dispatcher_not_the_wrapper() -> None:
    dispatch.set_dispatch_interval(0.05)
    dispatch.set_dispatch_interval(0.01)
    store = SweptStore(nodes=2)
    _run_dispatcher(store, 0.3)
    assert len(store.sweep_gaps()) >= 6  # 0.05 s pauses would allow at most 5


def test_a_process_without_the_engine_is_left_alone() -> None:
    # A ServerApp under a deployed SuperLink has no engine: nothing is imported or wrapped.
    probe = (
        "import sys; from fedstream.sim.dispatch import ENGINE, set_dispatch_interval; "
        "print(set_dispatch_interval(0.01), ENGINE in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.split() == ["False", "False"]


def test_a_push_ends_the_pause_at_once() -> None:
    # A pause far longer than the test: only a message stored for a client can end it.
    # (Counting sweeps against the engine's pauses, 0.1 s at most, failed on a loaded
    # machine: there a woken sweep and a timed one look alike.)
    stop, pushed = threading.Event(), threading.Event()
    store = SweptStore(nodes=2)
    undo = dispatch._wake_on_store(store, pushed)
    paced = dispatch._Paced(stop, 30.0, pushed)
    threading.Timer(0.2, store.store_message_ins, (object(),)).start()  # the ServerApp's push
    began = time.monotonic()
    assert paced.wait() is False  # woken, not stopped
    assert time.monotonic() - began < 10
    undo()
    assert store.store_message_ins(object()) == "stored"  # the store still stores


def test_pushes_do_not_buy_more_than_a_fifth_of_a_core() -> None:
    # 20 ms sweeps, a push every 10 ms: still at least 4 x 20 ms between sweeps.
    assert dispatch.set_dispatch_interval(0.01)
    store = SweptStore(nodes=4, cpu_seconds_per_call=0.005)
    _run_dispatcher(store, 0.6, push_every=0.01)
    gaps = store.sweep_gaps()
    assert gaps and min(gaps) >= 0.09


def test_the_store_hook_is_removed_when_the_engine_stops() -> None:
    assert dispatch.set_dispatch_interval(0.01)
    store = SweptStore(nodes=1)
    _run_dispatcher(store, 0.05)
    assert "store_message_ins" not in vars(store)  # the class's own method again


def test_a_costly_sweep_never_pauses_longer_than_flower_would() -> None:
    # A sweep that took 1 s of CPU asks for a 4 s pause; Flower's dispatcher passes its
    # own 0.1 s as the timeout, and that caps it.
    paced = dispatch._Paced(threading.Event(), 0.01, threading.Event())
    paced._woke = time.thread_time() - 1.0
    began = time.monotonic()
    assert paced.wait(dispatch.FLOWER_INTERVAL) is False
    assert time.monotonic() - began < 1.0


def test_flowers_own_grid_and_link_state_wake_the_dispatcher() -> None:
    # The stand-in store above only shows the pause ends on a store. What makes it work in
    # a simulation is that Flower's InMemoryGrid stores the ServerApp's messages through the
    # very LinkState object the engine hands its dispatcher: checked here on Flower's own.
    from flwr.app import Message, MessageType, RecordDict
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    pushed = threading.Event()
    undo = dispatch._wake_on_store(factory.state(), pushed)
    grid = InMemoryGrid(state_factory=factory)  # as flwr.simulation builds it
    message = Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY)
    message.metadata.__dict__["_src_node_id"] = 1  # the SuperLink, as the grid's messages say
    grid.push_messages([message])  # (refused: no run is registered; the wake comes anyway)
    assert pushed.is_set()
    undo()
    assert "store_message_ins" not in vars(factory.state())
