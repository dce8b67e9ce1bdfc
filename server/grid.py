"""The Grid as fedstream's round loop sees it.

Four things change against the Grid Flower hands a ServerApp, nothing else:
- nodes are listed in client order (the roster's), so Flower's seeded samplers pick the
  same clients in every run;
- replies are collected promptly: Flower pulls every 100 ms, which on short streaming
  rounds is most of the round. This pulls after 2 ms, then every 5 % of the time waited
  so far (at most every 100 ms): the last reply is seen at most 5 % late, and a long round
  costs no more polls than before. (A geometric backoff would be up to 50 % late: a
  quarter-second trip seen 0.1 s late, paid again on every trip of a round.)
- replies that come after their trip are not left on the grid (`Stragglers`);
- a reply whose upload was cut off (its device killed mid-send) costs the round's timeout
  at most: Flower would retry fetching its parts for up to two hours (`bounded_pulls`),
  and its error reply is charged to the device that was sent the message, not to the
  server's own node, which Flower names as its sender.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flwr.app import Message, Metadata
from flwr.app.message import make_message
from flwr.serverapp import Grid
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.run import Run

from fedstream.server import stopping

FIRST_PULL = 0.002
MAX_PULL = 0.1
PULL_LATENESS = 0.05  # pause between pulls, as a fraction of the time waited so far
PULL_GROUP = 4  # replies asked for per pull when they are folded as they come
PULL_GRACE = 2.0  # seconds a reply's parts may still take once the trip's time is up

_pull_deadline: float | None = None  # monotonic; while send_and_collect pulls


def _bounded_pull_objects(*args: Any, **kwargs: Any) -> dict[str, bytes]:
    """Flower's `pull_objects`, giving up on a reply's parts when the trip's time is up
    (plus PULL_GRACE) rather than after Flower's PULL_MAX_TIME of two hours."""
    if _pull_deadline is not None:
        left = max(PULL_GRACE, _pull_deadline + PULL_GRACE - time.monotonic())
        kwargs["max_time"] = min(kwargs.get("max_time") or math.inf, left)
    return _flower_pull_objects(*args, **kwargs)


_flower_pull_objects = inflatable_utils.pull_objects


def bounded_pulls() -> None:
    """Route the deployment grid's object pulls through `_bounded_pull_objects`."""
    with contextlib.suppress(ImportError):
        from flwr.superlink.grid import http_grid

        if http_grid.pull_objects is _flower_pull_objects:
            http_grid.pull_objects = _bounded_pull_objects


@contextlib.contextmanager
def _pulls_until(deadline: float | None) -> Iterator[None]:
    global _pull_deadline
    _pull_deadline = deadline
    try:
        yield
    finally:
        _pull_deadline = None


def _charged(reply: Message, sent_to: dict[str, int]) -> Message:
    """An error reply Flower made up for a message it could not fetch names the server's
    node as sender: name the node the message was sent to instead."""
    node = sent_to.get(reply.metadata.reply_to_message_id)
    if node is None or not reply.has_error() or reply.metadata.src_node_id == node:
        return reply
    meta = reply.metadata
    return make_message(
        metadata=Metadata(
            run_id=meta.run_id, message_id=meta.message_id, src_node_id=node,
            dst_node_id=meta.dst_node_id, reply_to_message_id=meta.reply_to_message_id,
            group_id=meta.group_id, created_at=meta.created_at, ttl=meta.ttl,
            message_type=meta.message_type,
        ),
        error=reply.error,
    )


def send_and_collect(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float | None = None,
    on_reply: Callable[[Message], None] | None = None,
    enough: Callable[[], bool] | None = None,
    late: set[str] | None = None,
) -> list[Message]:
    """Push messages, then pull replies with backoff until all are in or time is up.

    With `on_reply`, each reply is handed over as it arrives and not kept, and replies are
    pulled a few at a time (a pull returns every ready reply it is asked for, whole): a
    caller that folds replies into a sum holds `PULL_GROUP` replies at most, however many
    clients answered at once. With `enough`, collecting also stops as soon as it says the
    replies so far suffice. Ids still pending when collecting stops (time up, or enough)
    are added to `late`: see `Stragglers`.
    """
    messages = list(messages)
    # The timeout counts from before the push: pushing a model to every node of a busy
    # SuperLink can take seconds, and a round must not last its timeout on top of them.
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    ids = list(grid.push_messages(messages))
    sent_to = {i: m.metadata.dst_node_id for i, m in zip(ids, messages, strict=True)}
    pending = set(ids)
    replies: list[Message] = []
    with _pulls_until(deadline):
        while pending:
            stopping.check()
            if on_reply is None:
                got = [_charged(m, sent_to) for m in grid.pull_messages(pending)]
                pending.difference_update(m.metadata.reply_to_message_id for m in got)
                replies.extend(got)
            else:
                _pull_each(grid, ids, pending, lambda r: on_reply(_charged(r, sent_to)), enough)
            if pending and enough is not None and enough():
                break
            now = time.monotonic()
            if not pending or (deadline is not None and now >= deadline):
                break
            time.sleep(min(MAX_PULL, max(FIRST_PULL, PULL_LATENESS * (now - start))))
    if late is not None:
        late.update(pending)
    return replies


class Stragglers:
    """Messages whose replies were no longer waited for, one set per trip.

    A reply that comes after its trip ended (a slow device, or an answer the server did
    not need) would otherwise stay on the grid for good: on a SuperLink, a late model
    update is megabytes held until the run ends. `discard` pulls those that came in since,
    unread; a node that has not answered in `trips` trips is given up on.
    """

    def __init__(self, trips: int = 16) -> None:
        self._trips: deque[set[str]] = deque(maxlen=trips)

    def trip(self) -> set[str]:
        """A set for one trip's `send_and_collect(late=...)`."""
        self._trips.append(ids := set())
        return ids

    def discard(self, grid: Grid) -> None:
        for _ in self.collect(grid):
            pass

    def collect(self, grid: Grid) -> Iterator[Message]:
        """The replies that came in since, pulled off the grid, for a caller that reads them."""
        for ids in self._trips:
            if ids:
                with _pulls_until(time.monotonic()):  # late already: no waiting for parts
                    got = list(grid.pull_messages(list(ids)))
                for reply in got:
                    ids.discard(reply.metadata.reply_to_message_id)
                    yield reply


def _pull_each(
    grid: Grid,
    pushed: list[str],
    pending: set[str],
    on_reply: Callable[[Message], None],
    enough: Callable[[], bool] | None,
) -> None:
    ids = [i for i in pushed if i in pending]  # in push order: a set's order is the hash's
    for start in range(0, len(ids), PULL_GROUP):
        for reply in grid.pull_messages(ids[start : start + PULL_GROUP]):
            pending.discard(reply.metadata.reply_to_message_id)
            on_reply(reply)
            del reply
        if enough is not None and enough():
            return  # the replies left on the grid are not needed


class OrderedGrid(Grid):
    def __init__(self, grid: Grid, order: Callable[[Iterable[int]], list[int]]) -> None:
        self._grid = grid
        self._order = order
        self.last_ids: list[int] = []

    def get_node_ids(self) -> Iterable[int]:
        ids = self._order(self._grid.get_node_ids())
        self.last_ids = ids  # the nodes the strategy last sampled from
        return ids

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return send_and_collect(self._grid, messages, timeout)

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)
