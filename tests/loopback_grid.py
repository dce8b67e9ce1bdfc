"""A Grid that delivers each message to a real ClientApp in this process.

Real fedstream ClientApps, real Flower messages, contexts and errors: only the transport
(SuperLink, Ray) is left out, so round logic can be tested in milliseconds. The simulation
tests run the same apps through Flower's Ray engine.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

Tamper = Callable[[int, Message], Message | None]  # (node, reply) -> reply, or None to drop


class LoopbackGrid(Grid):
    def __init__(
        self,
        app: ClientApp,
        clients: int,
        tamper: Tamper | None = None,
        node_config: Callable[[int], dict[str, Any]] = lambda p: {"partition-id": p},
    ) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.app, self.tamper = app, tamper
        self.nodes = {1000 + i: i for i in range(clients)}  # node id -> partition
        self.contexts = {
            node: Context(1, node, node_config(p), RecordDict(), {})
            for node, p in self.nodes.items()
        }
        self.inbox: dict[str, Message] = {}
        self.ids = itertools.count()
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = f"m{next(self.ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as err:  # as Flower does: the failure becomes an error reply
                reply = Message(Error(1, f"{type(err).__name__}: {err}"), reply_to=msg)
            if self.tamper is not None:
                reply = self.tamper(node, reply)
            if reply is not None:
                self.inbox[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.inbox.pop(i) for i in list(message_ids) if i in self.inbox]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        return self.pull_messages(self.push_messages(messages))

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        raise NotImplementedError
