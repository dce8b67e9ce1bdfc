"""The server pipeline in one function: strategy, rounds, records."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedstream.protocol.config import Config, ignored_settings, risky_settings, sampled_clients
from fedstream.server.privacy import Privacy, calibrated
from fedstream.server.records import History, MetricsLog
from fedstream.server.rounds import EvaluateFn, RoundHook, RoundSettings, run_rounds
from fedstream.server.secure import SecureAggregator
from fedstream.server.strategy import make_strategy


def run_federation(
    grid: Grid,
    cfg: Config,
    initial: ArrayRecord,
    out_dir: Path,
    evaluate: EvaluateFn | None = None,
    on_round: RoundHook | None = None,
    simulated: bool = False,
    n_classes: int | None = None,
) -> tuple[ArrayRecord, History]:
    """Run every round of `cfg` on `grid`, appending each round's record to metrics.jsonl.

    `simulated`: the clients are virtual, so secure aggregation's neighbour ring and the
    server's privacy noise are drawn from `cfg.seed` and a run repeats exactly; on real
    devices they stay secret. `n_classes`: the model's outputs, when the data decides them
    (a file's labels) rather than `stream.n_classes`."""
    log = MetricsLog(out_dir / "metrics.jsonl")

    def record(rec: dict, history: History) -> None:
        log.write(rec)
        if on_round:
            on_round(rec, history)

    settings = RoundSettings(
        rounds=cfg.federation.rounds,
        seed=cfg.seed,
        timeout=cfg.federation.round_timeout,
        evaluate_every=cfg.evaluation.every,
        progress=cfg.output.progress,
        sample_all=cfg.federation.fraction == 1.0,
    )
    settings.privacy, settings.secure = stages(cfg, cfg.seed if simulated else None,
                                                n_classes)
    return run_rounds(grid, make_strategy(cfg), initial, settings, record, evaluate)


def stages(
    cfg: Config, seed: int | None, n_classes: int | None = None
) -> tuple[Privacy | None, SecureAggregator | None]:
    """The optional stages of the server's round, as `cfg` turns them on; `seed` draws what
    would otherwise be secret (simulation only)."""
    secure = cfg.secure_aggregation.enabled
    privacy = None
    if cfg.privacy.enabled:
        privacy = Privacy(cfg.privacy, secure, seed, planned_noise(cfg))
    if not secure:
        return privacy, None
    classes = cfg.stream.n_classes if n_classes is None else n_classes
    return privacy, SecureAggregator(cfg.secure_aggregation, classes, seed, privacy)


def before_run(cfg: Config) -> list[str]:
    """What `fedstream sim` and `fedstream server` say before a run starts: settings it
    will not use, and the noise a private run adds."""
    notes = [*ignored_settings(cfg), *risky_settings(cfg)]
    lines = [f"fedstream: hint: {note}" for note in notes]
    plan = privacy_plan(cfg)
    return [*lines, f"fedstream: {plan}"] if plan else lines


def privacy_plan(cfg: Config) -> str | None:
    """The noise a private run will add, said before it starts (a calibrated multiplier
    decides what the run is worth, so it should not first appear in the summary)."""
    dp = cfg.privacy
    if not dp.enabled:
        return None
    z = planned_noise(cfg)
    how = f"noise multiplier {z:.4g}"
    if dp.target_epsilon > 0:
        sampled = sampled_clients(cfg.federation, cfg.secure_aggregation)
        how += (f" (calibrated for epsilon {dp.target_epsilon:g} at delta {dp.delta:g} over "
                f"{cfg.federation.rounds} rounds of {sampled} of {cfg.federation.clients} "
                "clients)")
    return f"privacy: {how}, clip {dp.clip_norm:g}, noise added by the {dp.noise_at}"


def planned_noise(cfg: Config) -> float:
    """The noise multiplier of the run: as set, or calibrated to `privacy.target_epsilon`
    over the planned rounds (every client online, so the cohort is Flower's sample)."""
    dp, fed = cfg.privacy, cfg.federation
    if dp.target_epsilon <= 0:
        return dp.noise_multiplier
    sampled = sampled_clients(fed, cfg.secure_aggregation)
    return calibrated(dp.target_epsilon, dp.delta, fed.rounds, sampled, fed.clients)
