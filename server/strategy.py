"""Server strategies: Flower's own FedAvg, FedAdam and FedYogi, configured from fedstream config.

`fedavg` with a server learning rate other than 1 (or server momentum) is Flower's FedAvgM:
on streams each round brings few local steps, and a larger server step makes up for it.
The arithmetic stays Flower's (weighted by `num-examples`). Around it, small mixins: the
metric aggregation is dropped (per-client reports are summed into round records
instead), replies that carry no examples (a client with an empty stream that round) are
left out rather than divided by, the new model keeps the dtypes the clients trained in,
and FedAvg of the one message a secure round hands over is that message.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi, Strategy

from fedstream.protocol import messages as m
from fedstream.protocol.config import Config, least_clients
from fedstream.protocol.updates import array, view


def _no_metric_average(_records: list[RecordDict], _key: str) -> MetricRecord:
    return MetricRecord()


class _SkipEmpty:
    """Mixin: aggregate only the replies that trained on something."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        useful = [r for r in replies if r.has_error() or _examples(r) > 0]
        if not any(not r.has_error() for r in useful):
            return None, None
        return super().aggregate_train(server_round, useful)  # type: ignore[misc]


def _examples(reply: Message) -> int:
    return int(reply.content[m.METRICS][m.NUM_EXAMPLES])


class _MeanOfOne:
    """Mixin for FedAvg: the weighted mean of a single update is that update.

    A secure round hands the strategy exactly one message, the unmasked average. Flower's
    FedAvg would arrive at the same values by copying the model five times (to numpy,
    times a weight of 1.0, back through `np.save`): a few milliseconds on every secure
    round, spent while every client waits for the next model. Flower's checks and log
    lines stay.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if sum(not r.has_error() for r in replies) != 1:
            return super().aggregate_train(server_round, replies)  # type: ignore[misc]
        strategy: FedAvg = self  # type: ignore[assignment]
        (valid,), _ = strategy._check_and_log_replies(replies, is_train=True)
        arrays = next(r for r in valid.content.values() if isinstance(r, ArrayRecord))
        metrics = strategy.train_metrics_aggr_fn([valid.content], strategy.weighted_by_key)
        return arrays, metrics


class _KeepDtypes:
    """Mixin: the new model keeps the dtypes the clients trained in.

    Flower averages with Python floats and steps with numpy float64 scalars, which (NEP 50)
    turn a float32 model into float64, so every client would download twice the bytes from
    round 2 on, and an integer array (a BatchNorm counter) into float64, which differential
    privacy would then clip and noise as a weight. Only the arrays whose dtype changed are
    rebuilt; integers are rounded, not truncated.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        trained = next((r.content[m.ARRAYS] for r in replies
                        if not r.has_error() and m.ARRAYS in r.content), None)
        if arrays is None or trained is None:
            return arrays, metrics
        changed = {
            key: _as(values, np.dtype(trained[key].dtype))
            for key, arr in arrays.items()
            if key in trained and (values := view(arr)).dtype != np.dtype(trained[key].dtype)
        }
        if not changed:
            return arrays, metrics
        kept = {k: array(changed[k]) if k in changed else a for k, a in arrays.items()}
        return ArrayRecord(kept), metrics


def _as(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`values` in `dtype`, an array even when 0-d (BatchNorm's `num_batches_tracked`),
    where numpy's rounding hands back a scalar."""
    return np.asarray((np.rint(values) if dtype.kind in "iu" else values).astype(dtype))


class StreamFedAvg(_SkipEmpty, _KeepDtypes, _MeanOfOne, FedAvg):
    pass


class StreamFedAvgM(_SkipEmpty, _KeepDtypes, FedAvgM):
    pass


class StreamFedAdam(_SkipEmpty, _KeepDtypes, FedAdam):
    pass


class StreamFedYogi(_SkipEmpty, _KeepDtypes, FedYogi):
    pass


def flower_strategy(cfg: Config) -> str:
    """The Flower strategy `make_strategy` builds for `cfg`, by name."""
    fed = cfg.federation
    if fed.strategy == "fedavg":
        return "FedAvg" if fed.server_lr == 1.0 and fed.server_momentum == 0.0 else "FedAvgM"
    return {"fedadam": "FedAdam", "fedyogi": "FedYogi"}[fed.strategy]


def make_strategy(cfg: Config) -> Strategy:
    fed = cfg.federation
    least = least_clients(fed, cfg.secure_aggregation)
    common = {
        "fraction_train": fed.fraction,
        "fraction_evaluate": 0.0,
        "min_train_nodes": least,
        "min_available_nodes": least,
        "train_metrics_aggr_fn": _no_metric_average,
    }
    if fed.strategy == "fedavg":
        if flower_strategy(cfg) == "FedAvg":
            return StreamFedAvg(**common)
        # FedAvg with a server step size (and momentum): Flower's FedAvgM.
        return StreamFedAvgM(
            **common, server_learning_rate=fed.server_lr, server_momentum=fed.server_momentum
        )
    opt = {"eta": fed.server_lr, "eta_l": cfg.learner.lr, "beta_1": fed.beta1, "tau": fed.tau}
    if fed.strategy == "fedadam":
        return StreamFedAdam(**common, **opt, beta_2=fed.beta2)
    return StreamFedYogi(**common, **opt, beta_2=fed.beta2)
