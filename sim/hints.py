"""What `fedstream sim` says about a run before it starts: data and settings that look
like a mistake (an ID column as a feature, a file sorted by its label, a rare class,
two units of time), or that will cost the run (rows running out, rounding noise,
rounds failing from dropouts). Each hint is one line on stderr; none stops the run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from fedstream.protocol.config import Config, sampled_clients
from fedstream.protocol.fixedpoint import Quantizer
from fedstream.server.app import planned_noise
from fedstream.server.privacy import client_std, secure_clip
from fedstream.sim.detection import drifts_in_run
from fedstream.sim.federation import federation


def before_start(cfg: Config) -> list[str]:
    """Every hint `cfg` and its data call for, in the order a reader fixes them."""
    said = (
        identifier_hint(cfg), scale_hint(cfg), label_hint(cfg), order_hint(cfg), group_hint(cfg),
        skew_hint(cfg), rare_class_hint(cfg), time_units_hint(cfg), drift_hint(cfg),
        exhaustion_hint(cfg), precision_hint(cfg), dropout_hint(cfg),
    )
    return [hint for hint in said if hint]


DROPOUT_FAILURE_LIMIT = 0.05  # share of secure rounds failing from dropouts worth a hint
NOISE_LIMIT = 0.01  # rounding noise per coordinate and round above which precision_hint speaks


def scale_hint(cfg: Config) -> str | None:
    """What to say when a file's features are far from unit scale and left unscaled."""
    dataset = federation(cfg).dataset
    big = [] if dataset is None or cfg.learner.standardize else dataset.unscaled()
    if not big:
        return None
    shown = ", ".join(f"{name!r} ~ {rms:.3g}" for name, rms in big[:3])
    return (
        f"fedstream: hint: feature columns far from unit scale ({shown}); with --set "
        "learner.standardize=true each client scales its features by their running mean "
        "and deviation"
    )


def identifier_hint(cfg: Config) -> str | None:
    """What to say when a file's feature columns look like row IDs or timestamps: fed to
    the model as numbers, they say only where a row sits in the file."""
    dataset = federation(cfg).dataset
    names = [] if dataset is None else dataset.identifiers()
    if not names:
        return None
    shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    if cfg.stream.features:  # named features: the fix is a shorter list, not an exclude
        kept = [f for f in cfg.stream.features if f not in names]
        fix = f"stream.features={json.dumps(kept)}"
    else:
        fix = f"stream.exclude={json.dumps([*cfg.stream.exclude, *names])}"
    time = "" if cfg.stream.time else ", or, for a time, order the rows by it (stream.time)"
    many = len(names) > 1
    return (
        f"fedstream: hint: feature column{'s' * many} {shown} look{'s' * (not many)} like "
        f"a row ID or a timestamp (a different whole number in every row, or epoch-sized "
        f"times in order): leave {'them' if many else 'it'} out (--set '{fix}'){time}"
    )


def exhaustion_hint(cfg: Config) -> str | None:
    """What to say when clients' rows run out long before the last round: the rounds
    after it train on nothing, and would otherwise just show as unaggregated rounds or
    idle clients. Clients differ (their rates by stream.rate_spread, their rows by the
    partition: a small site under partition.column), so each is looked at."""
    fed = federation(cfg)
    dataset = fed.dataset
    if dataset is None or cfg.stream.arrival == "time":  # then the rows span the run
        return None
    rounds, n = cfg.federation.rounds, cfg.federation.clients
    lasts = np.array([len(p) / r for p, r in zip(dataset.parts, fed.rates, strict=True)])
    short = np.flatnonzero(lasts < 0.8 * rounds)
    if not len(short):
        return None
    names = dataset.client_names

    def who(i: int) -> str:
        return f"client {i}" + (f" ({names[i]!r})" if names else "")

    first = short[np.argsort(lasts[short], kind="stable")][:3]
    shown = ", ".join(f"{who(i)} after about {lasts[i]:.1f} rounds" for i in first)
    more = ", ..." if len(short) > len(first) else ""
    fix = "lower stream.rate or federation.rounds"
    sizes = np.array([len(p) for p in dataset.parts])
    if cfg.partition.scheme == "dirichlet" and sizes.min() < 0.25 * sizes.mean():
        # The partition, not the rate, starves them: a small alpha gives some clients few rows.
        fix += (f", or raise partition.alpha (now {cfg.partition.alpha:g}; clients hold "
                f"{sizes.min()} to {sizes.max()} rows)")
    return (
        f"fedstream: hint: {cfg.stream.path or cfg.stream.source}: the rows of "
        f"{len(short)} of {n} clients at stream.rate = {cfg.stream.rate:g} a round run out "
        f"well before the last of the {rounds} rounds ({shown}{more}), and from then on "
        f"they have nothing new to train on: {fix}"
    )


def label_hint(cfg: Config) -> str | None:
    """What to say when a file's classes look like a mistake: numbers with fractions (a
    measurement chosen as the label trains a classifier with one output per distinct
    value), or names that differ only in case ('yes', 'Yes'), each a class of its own."""
    dataset = federation(cfg).dataset
    if dataset is None or not dataset.classes:
        return None
    twins = alike(dataset.classes)
    if twins:
        return (
            f"fedstream: hint: labels in {cfg.stream.label!r} that differ only in case "
            f"are classes of their own ({_shown(twins)}): if each group is one class, "
            "write its labels alike in the file"
        )
    try:
        values = np.asarray(dataset.classes, dtype=np.float64)
    except ValueError:
        return None
    if np.all(values == np.round(values)):
        return None
    return (
        f"fedstream: hint: the label column {cfg.stream.label!r} holds numbers with fractions "
        f"({len(values)} distinct values, each a class of its own): if it is a measurement, "
        "not a class, pick another stream.label"
    )


def order_hint(cfg: Config) -> str | None:
    """A file sorted (or grouped) by its label replays one class after another: the
    stream is then a chain of abrupt drifts, and a model that predicts the last label it
    saw scores near 100 %, which reads as learning. Said when every class sits in one
    block of rows and no time column orders them."""
    dataset = federation(cfg).dataset
    if dataset is None or not dataset.features or cfg.stream.time or len(dataset.y) < 50:
        return None
    changes = int(np.count_nonzero(np.diff(dataset.y)))
    if changes != len(np.unique(dataset.y)) - 1:
        return None
    return (
        f"fedstream: hint: {cfg.stream.path}: the rows are sorted by {cfg.stream.label!r} "
        f"(each class in one block, {changes + 1} blocks): replayed in order, each client "
        "sees one class after another, and repeating the last label scores near 100 %. If "
        "that order is not the stream's, shuffle the rows, or order them by a time column "
        "(stream.time)"
    )


RARE_CLASS = 0.05  # below this share of a file's rows a class is rare: a note, not a skew


def skew_hint(cfg: Config) -> str | None:
    """Your own file dealt to clients by label (partition.scheme = 'dirichlet', the
    default): some client then has none of a class the file is full of. That is the
    non-IID study the default is for, but replaying a file as it was it reads as the
    data's own, and it makes each client's labels more alike (the trivial predictors
    score higher than on the file). Said when a client lacks a class of 5 % or more,
    naming every such client of the (at most three) most common such classes."""
    dataset = federation(cfg).dataset
    if dataset is None or not dataset.features or cfg.partition.scheme != "dirichlet":
        return None
    share = dataset.class_shares()
    held = np.stack([np.bincount(dataset.y[rows], minlength=dataset.n_classes)
                     for rows in dataset.parts]) > 0  # (clients, classes)
    lacking = [c for c in np.argsort(-share, kind="stable")
               if share[c] >= RARE_CLASS and not held[:, c].all()]
    if not lacking:
        return None
    names = dataset.class_names()
    said = "; ".join(f"{_clients(np.flatnonzero(~held[:, c]))} no {names[c]!r} rows "
                     f"({100 * share[c]:.0f} % of the file)" for c in lacking[:3])
    more = f"; and {len(lacking) - 3} more classes" if len(lacking) > 3 else ""
    return (
        f"fedstream: hint: {cfg.stream.path}: the rows are dealt to clients by label "
        f"(partition.scheme = 'dirichlet', alpha {cfg.partition.alpha:g}), so {said}{more}: "
        "a non-IID split made here, not the data's own. To replay the file as it is, use "
        "partition.scheme = 'iid', or 'column' with the column that names each row's site"
    )


def _clients(ids: np.ndarray) -> str:
    """'client 3 holds', 'clients 1, 2 and 4 hold' (the first five, then how many more)."""
    shown = [str(i) for i in ids[:5]]
    if len(ids) == 1:
        return f"client {shown[0]} holds"
    listed = ", ".join(shown[:-1]) + f" and {shown[-1]}" if len(ids) <= 5 else \
        ", ".join(shown) + f" and {len(ids) - 5} more"
    return f"clients {listed} hold"


UNITS_APART = 100  # clients' median times this many times apart: another unit, likely


def time_units_hint(cfg: Config) -> str | None:
    """Clients whose times are orders of magnitude apart: one site logged seconds, another
    milliseconds (or a clock from its own start). Each client's rows stay in order, but
    on one clock (`stream.arrival = 'time'`, the only arrival this is said for) they
    arrive rounds apart, and the centralized baseline interleaves them wrongly."""
    dataset = federation(cfg).dataset
    if cfg.stream.arrival != "time" or dataset is None or dataset.time is None:
        return None
    medians = np.array([np.median(np.abs(dataset.time[rows])) if len(rows) else np.nan
                        for rows in dataset.parts])
    usable = np.flatnonzero(np.isfinite(medians) & (medians > 0))
    if len(usable) < 2:
        return None
    hi, lo = usable[np.argmax(medians[usable])], usable[np.argmin(medians[usable])]
    ratio = medians[hi] / medians[lo]
    if ratio < UNITS_APART:
        return None
    return (
        f"fedstream: hint: {cfg.stream.path}: client {hi}'s times in {cfg.stream.time!r} "
        f"(median {medians[hi]:.6g}) are about {ratio:.3g} times client {lo}'s "
        f"({medians[lo]:.6g}): one clock in two units (milliseconds and seconds)? Replayed "
        "by time (stream.arrival = 'time') they arrive rounds apart; write them in one unit"
    )


def rare_class_hint(cfg: Config) -> str | None:
    """A file with a rare class: accuracy will mostly measure the others. Said before the
    run, pointing at the per-class scores the summary gives."""
    dataset = federation(cfg).dataset
    if dataset is None or not dataset.features or len(dataset.y) == 0:
        return None
    share = dataset.class_shares()
    rare = [c for c in np.argsort(share, kind="stable") if 0 < share[c] < RARE_CLASS]
    if not rare:
        return None
    names = dataset.class_names()
    listed = ", ".join(f"{names[c]!r} {100 * share[c]:.1f} %" for c in rare[:3])
    more = f" and {len(rare) - 3} more" if len(rare) > 3 else ""
    return (
        f"fedstream: note: {cfg.stream.path}: rare class{'es' * (len(rare) > 1)} ({listed}"
        f"{more} of the rows): accuracy mostly measures the others; the summary gives "
        "balanced accuracy, Cohen's kappa and each class's recall (per_class)"
    )


def alike(names: Sequence[str]) -> list[list[str]]:
    """Groups of names that differ only in case or surrounding spaces ('yes', 'Yes ')."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.strip().casefold(), []).append(name)
    return [group for group in groups.values() if len(group) > 1]


def _shown(twins: list[list[str]]) -> str:
    return "; ".join(", ".join(map(repr, names)) for names in twins[:3])


def group_hint(cfg: Config) -> str | None:
    """partition.column values that differ only in case or spaces make clients of their
    own (a one-row 'berlin ' beside 'berlin'): say so."""
    dataset = federation(cfg).dataset
    twins = alike(dataset.client_names) if dataset is not None else []
    if not twins:
        return None
    return (
        f"fedstream: hint: values of partition.column {cfg.partition.column!r} that differ "
        f"only in case or spaces are clients of their own ({_shown(twins)}): if each group is one "
        "site, write its values alike in the file"
    )


def drift_hint(cfg: Config) -> str | None:
    """A file is replayed as it is unless a drift key is set; setting one (even only
    drift.stagger) turns on relabelling, which changes the user's own data: say so, and
    say when the drift times lie beyond the run (on any source)."""
    if cfg.drift.kind == "none":
        return None
    d, rounds = cfg.drift, cfg.federation.rounds
    reached = drifts_in_run(cfg)
    if not reached:
        at = ", ".join(f"{t:g}" for t in d.at)
        what = cfg.stream.path if cfg.stream.source in ("csv", "jsonl") else "the streams"
        return (
            f"fedstream: note: no client meets drift.at = [{at}] within the {rounds} rounds: "
            f"the classes of {what} do not change during this run"
        )
    if cfg.stream.source not in ("csv", "jsonl"):
        return None
    how = "relabels" if d.kind == "abrupt" else f"blends, over drift.width = {d.width:g} rounds,"
    at = ", ".join(f"{t:g}" for t in reached)
    return (
        f"fedstream: note: drift.kind = {d.kind!r} {how} the classes of {cfg.stream.path} "
        f"into a new permutation after {at} rounds (each client's time shifted by up to "
        f"drift.stagger = {d.stagger:g}), to simulate drift; set drift.kind = \"none\" to "
        "replay the file as it is"
    )


def precision_hint(cfg: Config) -> str | None:
    """What to say when secure aggregation's fixed point is so coarse that its rounding
    noise swamps training: each update is weighed by min(examples, max_weight) /
    max_weight and rounded (without bias) to ring steps of parties x clip / 2^(bits - 1),
    so a small ring, a huge clip or a max_weight far above a round's examples make every
    round add noise to the model, with no error anywhere."""
    sa, dp = cfg.secure_aggregation, cfg.privacy
    if not sa.enabled:
        return None
    per_round = cfg.stream.rate
    if cfg.stream.arrival == "time":  # a file's rows spread over the run: rows a round
        dataset = federation(cfg).dataset
        if dataset is not None:
            per_round = len(dataset.y) / (cfg.federation.clients * cfg.federation.rounds)
    examples = min(per_round, cfg.stream.budget or per_round)
    parties = sampled_clients(cfg.federation, sa)
    if dp.enabled:  # every update weighs in full, and the range covers the clients' noise
        weight = 1.0
        noisy = dp.noise_at == "clients"
        std = client_std(planned_noise(cfg), dp.clip_norm, parties) if noisy else 0.0
        clip = secure_clip(sa.clip, dp.clip_norm, std)
        why = f"clip = {clip:.3g}, raised to cover the clients' noise"
        fix = "secure_aggregation.bits"
    else:
        weight = min(examples, sa.max_weight) / sa.max_weight
        clip = sa.clip
        why = f"clip = {clip:g}, about {examples:g} examples each against max_weight = " \
              f"{sa.max_weight}"
        fix = ("secure_aggregation.bits, lower secure_aggregation.clip, or lower "
               "secure_aggregation.max_weight towards a round's examples")
    step = 1.0 / (Quantizer(sa.bits, clip, parties).scale * weight)
    noise = step / 2 / parties**0.5  # at most, per coordinate of a round's mean change
    if noise <= NOISE_LIMIT:
        return None
    return (
        f"fedstream: hint: secure aggregation's rounding adds noise of up to {noise:.2g} to "
        f"every coordinate of the model each round (steps of {step:.2g}: bits = {sa.bits}, "
        f"{parties} clients a round, {why}), enough to drown the updates: raise {fix}"
    )


def dropout_hint(cfg: Config) -> str | None:
    """What to say when dropouts alone would fail many secure rounds: a survivor whose
    share group keeps fewer than t members cannot be unmasked. Degree 0 widens the groups
    for `secure_aggregation.dropout`, but a threshold fraction near the survival rate
    leaves too little margin, even with every other client a neighbour."""
    from fedstream.protocol import secagg

    sa, dropout = cfg.secure_aggregation, cfg.simulation.dropout  # the rate this run has
    if not sa.enabled or dropout <= 0:
        return None
    parties = sampled_clients(cfg.federation, sa)
    degree, t = secagg.round_shape(parties, sa.degree, sa.threshold, sa.dropout)
    failing = secagg.dropout_failure(parties, degree, t, dropout)
    if failing <= DROPOUT_FAILURE_LIMIT:
        return None
    lowest = secagg.round_shape(parties, sa.degree, 0.51, sa.dropout)
    better = secagg.dropout_failure(parties, *lowest, dropout)
    fix = ("lower secure_aggregation.threshold towards 0.51 (about "
           f"{better:.0%} then), or sample more clients a round") if better < failing / 2 else \
        "more clients a round make it rarer"
    return (
        f"fedstream: hint: with {dropout:.0%} of clients dropping, up to about "
        f"{failing:.0%} of secure rounds fail from dropouts alone ({parties} clients a "
        f"round, {degree} neighbours each, {t} of {degree + 1} shares needed): {fix}"
    )
