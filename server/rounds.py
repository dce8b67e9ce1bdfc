"""The server's round loop: sample, send, aggregate, record; and carry on whatever fails.

Flower's `Strategy.start` runs rounds too, but it stops at the first aggregation error and
records nothing per client; a long-running federation must survive a bad round, keep the
previous global model, and write down why.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from tqdm import tqdm

from fedstream.server import stopping
from fedstream.server.grid import OrderedGrid, Stragglers, send_and_collect
from fedstream.server.privacy import Privacy
from fedstream.server.records import (
    SILENT,
    History,
    client_name,
    round_record,
    secure_round_record,
)
from fedstream.server.roster import Roster
from fedstream.server.secure import SecureAggregator

ROSTER_TIMEOUT = 30.0  # a node that cannot say who it is within this is asked next round
EvaluateFn = Callable[[int, ArrayRecord], dict[str, float] | None]
RoundHook = Callable[[dict[str, Any], History], None]
ModelHook = Callable[[int, ArrayRecord, History], None]  # after each round: e.g. checkpoint


@dataclass
class RoundSettings:
    rounds: int
    seed: int
    timeout: float
    evaluate_every: int = 0
    progress: bool = True
    sample_all: bool = False  # every node trains every round: identities can wait
    secure: SecureAggregator | None = None  # sum encrypted updates instead of reading them
    privacy: Privacy | None = None  # clip, noise and account (differential privacy)
    first_round: int = 1  # later when resuming from a checkpoint


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    settings: RoundSettings,
    on_round: RoundHook,
    evaluate: EvaluateFn | None = None,
    history: History | None = None,
    after_round: ModelHook | None = None,
) -> tuple[ArrayRecord, History]:
    late = Stragglers()  # plaintext replies that came after their round: pulled off, unread
    history = history or History()
    roster = Roster(history.client_of)  # the history's own map: a checkpoint keeps it
    bar = tqdm(
        total=settings.rounds, initial=settings.first_round - 1,
        disable=not settings.progress, unit="round", leave=True,
        mininterval=0, miniters=1,  # a round is coarse: draw every one, even fast ones
    )
    for server_round in range(settings.first_round, settings.rounds + 1):
        started = time.perf_counter()
        if settings.secure is None:
            done = _plain_round(grid, roster, strategy, server_round, arrays, settings, late,
                                started)
        else:
            done = _secure_round(grid, roster, strategy, server_round, arrays, settings,
                                 settings.secure, started)
        arrays, record = done.arrays, done.record
        _complete(record, done, roster, settings)
        if evaluate and settings.evaluate_every and server_round % settings.evaluate_every == 0:
            record["global_eval"] = evaluate(server_round, arrays)
        history.add(record)
        on_round(record, history)
        if after_round:
            after_round(server_round, arrays, history)
        if stopping.requested():  # Ctrl-C has said where the rounds end: no redraw after it
            bar.disable = True
        bar.set_postfix(_postfix(record, history), refresh=False)
        bar.update(1)
    bar.close()
    return arrays, history


@dataclass
class _Round:
    """A round's outcome, plaintext or secure, in the terms the rest of the loop needs."""

    arrays: ArrayRecord  # the new global model (the old one if the round failed)
    error: str | None
    record: dict[str, Any]
    contributed: list[int]  # nodes that gave an update (their ids may be shared: twins)
    summed: int  # updates in the sum, as differential privacy counts them
    in_sum: list[int]  # nodes whose updates the sum holds
    unchecked: bool = False  # a secure sum whose totals failed their checks (counts unknown)


def _plain_round(
    grid: Grid,
    roster: Roster,
    strategy: Strategy,
    server_round: int,
    arrays: ArrayRecord,
    settings: RoundSettings,
    late: Stragglers,
    started: float,
) -> _Round:
    late.discard(grid)
    sent, replies = _exchange(grid, roster, strategy, server_round, arrays, settings, late.trip())
    new, error = _aggregate(strategy, server_round, replies, arrays, settings.privacy)
    record = round_record(server_round, sent, replies, roster.client_of,
                          time.perf_counter() - started)
    contributed = [r.metadata.src_node_id for r in replies if not r.has_error()]
    return _Round(new, error, record, contributed, len(contributed), contributed)


def _secure_round(
    grid: Grid,
    roster: Roster,
    strategy: Strategy,
    server_round: int,
    arrays: ArrayRecord,
    settings: RoundSettings,
    secure: SecureAggregator,
    started: float,
) -> _Round:
    sent = _sample(grid, roster, strategy, server_round, arrays, settings)
    outcome = secure.round(grid, strategy, server_round, arrays, sent, roster.client_of,
                           settings.timeout)
    answered = [f["node"] for f in outcome.failures if f["reason"] != SILENT]
    _name_failed(grid, roster, answered, settings)
    record = secure_round_record(server_round, len(sent), outcome, roster.client_of,
                                 time.perf_counter() - started)
    failed = {f["node"] for f in outcome.failures}
    contributed = [n for n in (msg.metadata.dst_node_id for msg in sent) if n not in failed]
    # Also those that failed after their input; under client noise, only inputs that carry
    # their noise count towards it.
    summed = outcome.totals["contributors"]
    if settings.privacy is not None and settings.privacy.client_noise:
        summed = outcome.totals["privatised"]
    in_sum = outcome.summed_nodes
    unchecked = bool(in_sum) and not outcome.totals_checked  # zeros: counts unknown
    return _Round(outcome.arrays, outcome.error, record, contributed, summed, in_sum, unchecked)


def _complete(record: dict[str, Any], done: _Round, roster: Roster,
              settings: RoundSettings) -> None:
    """What every round's record says besides its replies: shared ids, whether it was
    aggregated and why not, and what it cost in privacy."""
    record["shared_client_ids"] = roster.twins(done.contributed)
    record["aggregated"] = done.error is None
    # A secure round that failed after its sum was unmasked still showed the server the
    # clients' noisy sum: accounted as if released.
    seen = settings.secure is not None and bool(done.in_sum)
    if settings.privacy is not None and (done.error is None or seen):
        names = [client_name(n, roster.client_of) for n in done.in_sum]
        record["privacy"] = settings.privacy.release(done.summed, names, done.unchecked)
    if done.error:
        record["aggregation_error"] = _explained(done.error, record, settings.timeout)


def _exchange(
    grid: Grid,
    roster: Roster,
    strategy: Strategy,
    server_round: int,
    arrays: ArrayRecord,
    settings: RoundSettings,
    late: set[str],
) -> tuple[list[Message], list[Message]]:
    """Sample clients, send them the model, and collect their replies in client order."""
    sent = _sample(grid, roster, strategy, server_round, arrays, settings)
    replies = send_and_collect(grid, sent, timeout=settings.timeout, late=late)
    roster.learn(replies)
    _name_failed(grid, roster, [r.metadata.src_node_id for r in replies if r.has_error()], settings)
    # Replies arrive in any order; summing floats in a fixed order keeps runs bit-identical.
    replies.sort(key=lambda r: roster.client_of.get(r.metadata.src_node_id, -1))
    return sent, replies


def _name_failed(grid: Grid, roster: Roster, nodes: list[int], settings: RoundSettings) -> None:
    """Learn which clients failed nodes are; a silent node would only make us wait."""
    if any(n not in roster.client_of for n in nodes):
        roster.refresh(grid, timeout=min(settings.timeout, ROSTER_TIMEOUT), nodes=nodes)


def _sample(
    grid: Grid,
    roster: Roster,
    strategy: Strategy,
    server_round: int,
    arrays: ArrayRecord,
    settings: RoundSettings,
) -> list[Message]:
    """The strategy's train messages for this round, sampled reproducibly in client order."""
    if not settings.sample_all:  # a seeded partial sample needs every identity first
        roster.refresh(grid, timeout=min(settings.timeout, ROSTER_TIMEOUT))
    if settings.privacy is not None and settings.privacy.secret_cohorts:
        random.seed(secrets.token_bytes(32))  # Flower samples with `random`
    else:
        random.seed(settings.seed * 1_000_003 + server_round)
    ordered = OrderedGrid(grid, roster.ordered)
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), ordered))
    if settings.privacy is not None:  # a restarted device's old node is the same client
        clients = {client_name(n, roster.client_of) for n in ordered.last_ids}
        settings.privacy.ask(messages, population=len(clients))
    return messages


def _aggregate(
    strategy: Strategy,
    server_round: int,
    replies: list[Message],
    arrays: ArrayRecord,
    privacy: Privacy | None = None,
) -> tuple[ArrayRecord, str | None]:
    """Aggregate, or keep the previous model and say why not. Under differential privacy
    the strategy steps with the private mean, as it does with a secure round's sum."""
    try:
        if privacy is not None and any(not r.has_error() for r in replies):
            replies = [privacy.mean(server_round, replies, arrays)]
        new, _ = strategy.aggregate_train(server_round, replies)
    except Exception as err:
        return arrays, f"{type(err).__name__}: {err}"
    if new is None:
        return arrays, "no client update to aggregate"
    return new, None


def _explained(error: str, record: dict[str, Any], timeout: float) -> str:
    """A round that no client's update reached says why, when the clients agree on it:
    "no client update to aggregate" alone reads like a data problem, and the cause (a
    timeout too short, an exception in every client) is otherwise only in metrics.jsonl."""
    reasons = sorted({f["reason"] for f in record["failures"]})
    kinds = {r.split(":", 1)[0] for r in reasons}  # an exception's name, before its words
    if record["clients_ok"] or not reasons or len(kinds) != 1:
        return error
    if reasons == [SILENT]:
        return f"{error}: no client replied within federation.round_timeout ({timeout:g} s)"
    if len(reasons) == 1:
        return f"{error}: every client failed with {reasons[0]}"
    (kind,) = kinds  # the same error, in words that name each client (e.g. offline)
    if not kind.isidentifier():
        return error
    return f"{error}: every client failed with {kind}, e.g. {reasons[0]}"


def _postfix(record: dict[str, Any], history: History) -> dict[str, str]:
    post = {"acc": _pct(history.accuracy), "round_acc": _pct(record["accuracy"])}
    if record["failures"]:
        post["failed"] = str(len(record["failures"]))
    return post


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"



