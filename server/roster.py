"""Which client each Flower node is.

Flower node ids are random per run; clients have stable ids (their partition, or the name a
device was deployed with). The roster asks each new node once; `fedstream.server.grid` then
lists nodes in client order, so Flower's own samplers pick the same clients for the same seed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedstream.protocol import messages as m
from fedstream.server.grid import send_and_collect
from fedstream.server.records import error_reason

log = logging.getLogger("fedstream")


class Roster:
    def __init__(self) -> None:
        self.client_of: dict[int, int] = {}
        self.refused: dict[int, str] = {}  # node -> why it could not say which client it is

    def refresh(
        self, grid: Grid, timeout: float = 60.0, nodes: Iterable[int] | None = None
    ) -> None:
        """Ask nodes not seen before which client they are.

        A silent node is asked again next time; one that refused (and said why) is not.
        """
        candidates = grid.get_node_ids() if nodes is None else nodes
        new = [n for n in candidates if n not in self.client_of and n not in self.refused]
        if not new:
            return
        queries = [
            Message(m.roster_query(), dst_node_id=n, message_type=MessageType.QUERY) for n in new
        ]
        for reply in send_and_collect(grid, queries, timeout):
            node = reply.metadata.src_node_id
            client = None if reply.has_error() else m.client_id(reply.content)
            if client is not None:
                self.client_of[node] = client
            elif node not in self.refused:
                reason = error_reason(reply) if reply.has_error() else "its reply names no client"
                self.refused[node] = reason
                log.warning("node %s cannot take part: %s", node, reason)

    def learn(self, replies: Iterable[Message]) -> None:
        """Every train report names its client: learn identities without asking."""
        for reply in replies:
            client = None if reply.has_error() else m.client_id(reply.content)
            if client is not None:
                self.client_of[reply.metadata.src_node_id] = client

    def ordered(self, node_ids: Iterable[int]) -> list[int]:
        """Known nodes in client order, then unknown ones (only met when all are sampled)."""
        ids = list(node_ids)
        known = sorted((n for n in ids if n in self.client_of), key=self.client_of.__getitem__)
        return known + sorted(n for n in ids if n not in self.client_of)
