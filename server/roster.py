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
    def __init__(self, client_of: dict[int, int] | None = None) -> None:
        self.client_of: dict[int, int] = {} if client_of is None else client_of
        self.refused: dict[int, str] = {}  # node -> why it could not say which client it is
        self.twins_told: set[int] = set()  # clients claimed by two live nodes, warned about

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

    def twins(self, answered: Iterable[int]) -> list[int]:
        """Client ids that more than one of the nodes that answered a round gave: two
        devices started with the same --client-id. Both still train (the id is a label,
        not a key), but their reports are filed under one client, so the user is told
        (here once, in the log; in the summary at the end). Only one round's answers
        count: a restarted device's old node may stay listed a while, but never answers."""
        by_client: dict[int, list[int]] = {}
        for node in answered:
            if node in self.client_of:
                by_client.setdefault(self.client_of[node], []).append(node)
        shared = sorted(c for c, nodes in by_client.items() if len(nodes) > 1)
        for client in shared:
            if client not in self.twins_told:
                self.twins_told.add(client)
                log.warning(
                    "nodes %s all answered as client %d: were two devices started with the "
                    "same --client-id? Their reports are filed under one client",
                    ", ".join(map(str, sorted(by_client[client]))), client,
                )
        return shared

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
