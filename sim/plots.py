"""Plots of a results folder: accuracy over rounds against the baselines, per client, and
the privacy spent."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from fedstream.client.metrics import MAJORITY, NO_CHANGE
from fedstream.server.privacy import holds_against_server


def plot_all(out: Path, summary: dict[str, Any], records: list[dict[str, Any]]) -> list[Path]:
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    made = [accuracy_plot(plots, summary, records)]
    if any(rec["clients"] for rec in records):  # none under secure aggregation: only sums
        made.append(clients_plot(plots, summary, records))
    if any(_epsilon(rec) is not None for rec in records):
        made.append(privacy_plot(plots, summary, records))
    return made


def _epsilon(rec: dict[str, Any]) -> float | None:
    """The round's epsilon so far; None without a release or without a bound (no noise:
    infinite in memory, null in metrics.jsonl)."""
    eps = (rec.get("privacy") or {}).get("epsilon")
    return eps if eps is not None and math.isfinite(eps) else None


def _spent(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """Epsilon after every round: a round that released nothing (it failed) spent nothing,
    so it carries the last value on; a line drawn only through releases would slope up
    across such rounds as if they had cost something. Ends where no bound holds."""
    spent, eps = [], 0.0
    for rec in records:
        if rec.get("privacy"):
            eps = _epsilon(rec)
        if eps is None:
            break
        spent.append((rec["round"], eps))
    return spent


def privacy_plot(plots: Path, summary: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    """Privacy spent round by round, beside the accuracy it bought."""
    rounds, eps = zip(*_spent(records), strict=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(rounds, eps, color="C3", lw=2, marker=".", label="epsilon", drawstyle="steps-post")
    dp = summary.get("privacy") or {}
    ax.set(xlabel="round", ylabel=f"epsilon at delta = {dp.get('delta', 0):g}", ylim=(0, None),
           title=f"Privacy spent (noise multiplier {dp.get('noise_multiplier', 0):g}, clip "
                 f"{dp.get('clip_norm', 0):g}, noise added by the {dp.get('noise_at', '?')})")
    if not holds_against_server(dp.get("noise_at", "server"), summary.get("secure_aggregation")):
        ax.set_title(ax.get_title() + "\nepsilon holds for those who see the models, not "
                     "for the server", fontsize=10)
    ax.grid(alpha=0.3)
    _round_axis(ax)
    acc = ax.twinx()
    x = np.array([rec["round"] for rec in records])
    acc.plot(x, _series(summary["cumulative_accuracy"]), color="C0", lw=2,
             label="prequential accuracy (cumulative)")
    acc.set(ylabel="prequential accuracy (%)", ylim=(0, 100))
    lines = ax.get_lines()[:1] + acc.get_lines()[:1]
    _legend_below(ax, lines, [line.get_label() for line in lines])
    path = plots / "privacy.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _round_axis(ax: Any) -> None:
    """Whole rounds only on the x axis (a short run got ticks at 0.5, 1.5, ...)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_below(ax: Any, *handles_labels: Any) -> None:
    """The legend under the axes, where it covers no data (inside, it hid a drift's dip)."""
    handles, labels = handles_labels or ax.get_legend_handles_labels()
    # Anchored at the figure's bottom edge and hanging below it: savefig's tight bounding
    # box takes it in, whatever the axes' height.
    ax.figure.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3,
                     fontsize=8, frameon=False)


def _x(t: float) -> float:
    """Where time `t` falls on a round axis: round r is drawn at x = r and spans the times
    [r - 1, r), so a drift at the start of round r + 1 (time r) sits between r and r + 1."""
    return t + 0.5


def _mark_drifts(ax: plt.Axes, drift_times: list[float]) -> None:
    for i, t in enumerate(drift_times):
        ax.axvline(_x(t), color="crimson", linestyle=":", label="drift" if i == 0 else None)


def _series(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else 100 * v for v in values], dtype=float)


def nothing_scored(summary: dict[str, Any], evals: list[tuple[int, float]]) -> bool:
    """No accuracy to draw at all: every client offline, say, and no baseline."""
    curves = [summary["accuracy_per_round"]] + [
        b["accuracy_per_round"] for b in summary.get("baselines", {}).values()]
    return not evals and all(v is None for curve in curves for v in curve)


def accuracy_plot(plots: Path, summary: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    rounds = np.array([rec["round"] for rec in records])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(rounds, _series(summary["accuracy_per_round"]), color="C0", alpha=0.35,
            label="federated (round)")
    ax.plot(rounds, _series(summary["cumulative_accuracy"]), color="C0", lw=2,
            label="federated")
    for i, (name, base) in enumerate(summary.get("baselines", {}).items()):
        x = np.arange(1, len(base["cumulative_accuracy"]) + 1)
        ax.plot(x, _series(base["accuracy_per_round"]), color=f"C{i + 1}", alpha=0.35)
        ax.plot(x, _series(base["cumulative_accuracy"]), color=f"C{i + 1}", lw=2, label=name)
    _plot_references(ax, rounds, records)
    evals = [
        (r["round"], r["global_eval"]["accuracy"])
        for r in records
        if r.get("global_eval") and r["global_eval"].get("accuracy") is not None
    ]
    if evals:
        ex, ey = zip(*evals, strict=True)
        ax.plot(ex, 100 * np.array(ey), "k.--", label="global model, held-back slice")
    _mark_drifts(ax, summary.get("drift_times", []))
    if nothing_scored(summary, evals):  # else an empty frame around x = 0
        ax.text(0.5, 0.5, "no prediction was scored in this run", transform=ax.transAxes,
                ha="center", va="center", color="grey")
        ax.set_xlim(0.5, max(len(rounds), 1) + 0.5)
    ax.set(xlabel="round", ylabel="prequential accuracy (%)", ylim=(0, 100),
           title="Prequential accuracy (thin: per round, thick: cumulative)")
    ax.grid(alpha=0.3)
    _round_axis(ax)
    _legend_below(ax)
    path = plots / "accuracy.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


REFERENCE_LINES = (("no_change_correct", NO_CHANGE, "--"), ("majority_correct", MAJORITY, ":"))


def _plot_references(ax: Any, rounds: np.ndarray, records: list[dict[str, Any]]) -> None:
    """The trivial predictors' cumulative accuracy, grey: the floor the model must clear
    (not drawn when a round lacks the counts: an older run, or an older client)."""
    for key, label, style in REFERENCE_LINES:
        if not records or any(rec.get(key) is None for rec in records):
            continue
        seen = np.cumsum([rec["examples"] for rec in records], dtype=float)
        right = np.cumsum([rec[key] for rec in records], dtype=float)
        accuracy = np.divide(right, seen, out=np.full(len(seen), np.nan), where=seen > 0)
        ax.plot(rounds, 100 * accuracy, color="0.45", ls=style, lw=1.2, label=label)


def clients_plot(plots: Path, summary: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    clients = sorted({int(c) for rec in records for c in rec["clients"]})
    n_rounds = len(records)
    grid = np.full((max(len(clients), 1), max(n_rounds, 1)), np.nan)
    row = {c: i for i, c in enumerate(clients)}
    for j, rec in enumerate(records):
        for c, rep in rec["clients"].items():
            if rep["accuracy"] is not None:
                grid[row[int(c)], j] = 100 * rep["accuracy"]
    fig, ax = plt.subplots(figsize=(8, 0.25 * len(clients) + 2))
    img = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100, interpolation="nearest",
                    extent=(0.5, n_rounds + 0.5, len(clients) - 0.5, -0.5))
    fig.colorbar(img, ax=ax, label="prequential accuracy in round (%)")
    detections = [(rec["round"], row[d["client"]]) for rec in records for d in rec["drifts"]
                  if d["client"] in row]
    if detections:
        dx, dy = zip(*detections, strict=True)
        ax.scatter(dx, dy, marker="x", color="red", s=18, label="drift detected")
    times = summary.get("client_drift_times")  # staggered drifts: each client's own
    if times:
        own = [(_x(t), row[c]) for c in clients for t in times[c] if 0 < t < n_rounds]
        if own:
            sx, sy = zip(*own, strict=True)
            ax.scatter(sx, sy, marker="|", color="crimson", s=40, label="drift (this client)")
    else:
        _mark_drifts(ax, summary.get("drift_times", []))
    if ax.get_legend_handles_labels()[0]:
        _legend_below(ax)
    ax.set(xlabel="round", ylabel="client",
           title="Per-client accuracy (blank: not sampled, or no new samples)")
    _round_axis(ax)
    names = summary.get("client_names") or []  # partition.column: each client's site
    labels = [f"{c} {names[c]}" if c < len(names) else str(c) for c in clients]
    ax.set_yticks(range(len(clients)), labels, fontsize=6)
    path = plots / "clients.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
