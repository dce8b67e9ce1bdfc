"""Which client each Flower node is.

Flower node ids are random per run; clients have stable ids (their partition, or the name a
device was deployed with). The roster asks each new node once, and `RosterGrid` lists nodes
in client order, so Flower's own samplers pick the same clients for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message, MessageType
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedstream.protocol import messages as m


class Roster:
    def __init__(self) -> None:
        self.client_of: dict[int, int] = {}

    def refresh(self, grid: Grid, timeout: float = 60.0) -> None:
        """Ask nodes not seen before which client they are; silent nodes are asked again later."""
        new = [n for n in grid.get_node_ids() if n not in self.client_of]
        if not new:
            return
        queries = [
            Message(m.roster_query(), dst_node_id=n, message_type=MessageType.QUERY) for n in new
        ]
        for reply in grid.send_and_receive(queries, timeout=timeout):
            if not reply.has_error():
                client = int(reply.content[m.METRICS]["client-id"])
                self.client_of[reply.metadata.src_node_id] = client

    def ordered(self, node_ids: Iterable[int]) -> list[int]:
        """Known nodes in client order; a node of unknown identity is not offered for sampling."""
        known = [n for n in node_ids if n in self.client_of]
        return sorted(known, key=self.client_of.__getitem__)


class RosterGrid(Grid):
    """A Grid that lists nodes in client order, so seeded sampling is reproducible."""

    def __init__(self, grid: Grid, roster: Roster) -> None:
        self._grid = grid
        self.roster = roster

    def get_node_ids(self) -> Iterable[int]:
        return self.roster.ordered(self._grid.get_node_ids())

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

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)
