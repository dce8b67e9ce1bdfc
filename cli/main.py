"""The `fedstream` command."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedstream.protocol.config import Config, ConfigError, load, to_toml

app = typer.Typer(
    help="Federated online training on data streams, built on Flower.\n\n"
    "Exit codes: 0 done; 1 the run failed; 2 bad input (a config, a file, an option), "
    "nothing run; 130 / 143 stopped by Ctrl-C / SIGTERM. `fedstream config show` prints "
    "every config key with its default.",
    no_args_is_help=True,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"fedstream {version('fedstream')} (flwr {version('flwr')}, "
                   f"torch {version('torch')})")
        raise typer.Exit()


@app.callback()
def _options(
    _: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                    help="Print the versions of fedstream, Flower and torch.")]
    = False,
) -> None:
    """The options before a command (its help is the app's)."""


def fail(message: object, code: int) -> NoReturn:
    """Print `message` as an error and exit with `code`.

    The message is printed as it is, never read as markup: a column named "Druck [hPa]"
    or a value like "[a,b]" in it would otherwise vanish as a style tag.
    """
    err.print(f"[red]error:[/red] {escape(str(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file (defaults fill the rest).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one key: section.key=value (repeatable)."),
]


def address_problem(address: str, option: str, unix: bool = False) -> str:
    """What is wrong with a HOST:PORT (or, where `unix`, unix:///path) option, or ''."""
    if unix and address.startswith("unix:"):
        return "" if address.removeprefix("unix:").lstrip("/") else f"{option}: no socket path"
    host, colon, port = address.rpartition(":")
    forms = "HOST:PORT" + (" or unix:///path.sock" if unix else "")
    if not colon or not host or not port.isdigit():
        return f"{option} {address!r}: expected {forms}"
    if not 1 <= int(port) <= 65535:
        return f"{option} {address!r}: port {port} is not in 1..65535"
    return ""


def _load(config: Path | None, overrides: list[str] | None, extra: list[str]) -> Config:
    try:
        return load(config, [*(overrides or []), *extra])
    except ConfigError as e:
        fail(e, 2)


@app.command()
def sim(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[str | None, typer.Option(
        "--out", "-o", help="Results folder (default: output.dir, results/latest).")] = None,
    baselines: Annotated[
        bool, typer.Option("--baselines", help="Also run the local and centralized baselines.")
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="Join this Ray cluster (default: "
                     "simulation.ray_address, else $RAY_ADDRESS)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Simulate a federation of streaming clients (the embedded default without --config)."""
    extra = []
    if out is not None:
        extra.append(f"output.dir={_toml_str(out)}")
    if baselines:
        extra.append('simulation.baselines=["local", "centralized"]')
    if ray_address:
        extra.append(f"simulation.ray_address={_toml_str(ray_address)}")
    if quiet:
        extra.append("output.progress=false")
    cfg = _load(config, set_, extra)
    started = _stop_on_interrupt(Path(cfg.output.dir))  # a large file's parse takes a while
    # heavy imports only once the config is good
    from fedstream.client.sources import DataError
    from fedstream.sim.results import ResultsFolderBusy
    from fedstream.sim.runner import prepare, run

    _import_from_here()
    try:
        cfg = prepare(cfg)  # the file pinned, data and model loaded once, hints printed
    except (DataError, ValueError) as e:
        fail(e, 2)
    started.set()
    try:
        summary = run(cfg)
    except ResultsFolderBusy as e:  # another run took the folder since the check
        fail(e, 2)
    except Exception as e:
        # A Ctrl-C takes Ray's workers down at once, and the engine may end the run with
        # an error before the driver's own handler has run: let it end the run as stopped.
        time.sleep(1.0)
        fail(f"{type(e).__name__}: {e}", 1)
    report(summary, Path(cfg.output.dir))


def _import_from_here() -> None:
    """A `learner.model = "mymodels:factory"` module beside the user is importable, as
    `python -m` would make it: in this process and in the Ray workers it starts (they
    inherit PYTHONPATH)."""
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if here not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([here, *paths])


def _done_so_far(out: Path) -> str:
    """Where an interrupted run's finished rounds are, if any: metrics.jsonl is made empty
    when the run starts, so it existing says nothing."""
    metrics = out / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size > 0:
        return f"the rounds done so far are in {metrics}"
    return "no round had finished"


def _stop_on_interrupt(out: Path) -> threading.Event:
    """Ctrl-C ends `fedstream sim` at once, with exit 130 (SIGTERM: 143); set the returned
    event once the run starts writing into `out`.

    Flower's simulation engine stops its Ray workers on SIGINT but leaves the driver
    waiting on its own threads, so without this the first Ctrl-C hangs with nothing
    printed. Rounds already done are in metrics.jsonl (written as they finish); Ray's
    workers go down with their driver. Before the run starts, the folder still holds an
    earlier run's files, which are not this run's rounds.
    """
    from fedstream.server.records import stop_logs

    started = threading.Event()

    def interrupted(signum: int, _frame: object) -> None:
        # Whatever happens below, the command ends here with 128 + signum: an exception
        # raised in a signal handler would surface in whatever the main thread was
        # running, and end the run as a failure instead.
        threading.Timer(5.0, os._exit, (128 + signum,)).start()  # if Ray will not stop
        try:
            stop_logs()  # a round the ServerApp finishes while Ray stops is not written
            said = (f"{_done_so_far(out)} (no summary.json)" if started.is_set() else
                    "before the run started: nothing was written")
            err.print(f"\ninterrupted: {said}", markup=False, highlight=False, soft_wrap=True)
            sys.stderr.flush()
            sys.stdout.flush()
            import ray

            ray.shutdown()  # its head processes outlive a driver that just exits
        finally:
            os._exit(128 + signum)

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    return started


def report(summary: dict[str, Any], out: Path) -> None:
    """Print a finished run's summary; a run that aggregated no round exits 1."""
    print_summary(summary, out)
    if summary["rounds"] and not summary.get("rounds_aggregated", summary["rounds"]):
        err.print("[red]error:[/red] no round was aggregated: the global model is the initial "
                  "one (reasons above, per round in metrics.jsonl)", highlight=False)
        raise typer.Exit(1)


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def print_summary(summary: dict[str, Any], out: Path) -> None:
    clients, rounds = summary["clients"], summary["rounds"]
    table = Table(title=f"fedstream: {clients} client{'s' * (clients != 1)}, "
                  f"{rounds} round{'s' * (rounds != 1)}")
    balanced = summary.get("balanced_accuracy") is not None  # older runs have none
    table.add_column("run")
    table.add_column("prequential accuracy", justify="right")
    if balanced:
        table.add_column("balanced accuracy", justify="right")
    table.add_column("samples", justify="right")

    def row(name: str, run: dict[str, Any], accuracy: Any, style: str | None = None) -> None:
        cells = [_pct(accuracy), *([_pct(run.get("balanced_accuracy"))] if balanced else []),
                 str(run.get("samples_seen", summary["samples_seen"]))]
        table.add_row(name, *cells, style=style)

    row("federated", summary, summary["prequential_accuracy"])
    for name, base in summary.get("baselines", {}).items():
        row(name, base, base["prequential_accuracy"])
    for name, key, _, _ in _references():
        if summary.get(key) is not None:  # the federation's samples; no per-class counts
            row(name, {}, summary[key], style="dim")
    Console().print(table)
    # A deployed run counts its time since the server (re)started: a resumed run's rounds
    # before the restart are not in it.
    secs = summary.get("wall_seconds", summary.get("wall_seconds_since_start"))
    Console().print(
        f"{summary['client_updates']} client updates"
        + (f" ({empty} with no new samples)" if (empty := summary.get("client_updates_empty"))
           else "")
        + f", {summary['client_failures']} failures, "
        + (f"{secs:.1f} s, " if secs is not None else "")
        + f"{_size(summary['bytes_up'])} up, {_size(summary['bytes_down'])} down. "
        f"Results: {out}/",
        markup=False,
        soft_wrap=True,  # a long path stays on its line, whole, for copying
    )
    if summary.get("samples_dropped"):
        Console().print(
            f"[yellow]{summary['samples_dropped']} samples dropped on the devices[/yellow] "
            "(full spools, or labels beyond the run's stream.n_classes; `dropped` per round "
            "in metrics.jsonl)", highlight=False, soft_wrap=True,
        )
    if summary.get("samples_seen") and summary.get("prequential_loss") is None:
        Console().print(
            "[yellow]the model diverged[/yellow]: its loss is not a number (NaN or "
            "infinite; null in metrics.jsonl), so its predictions mean nothing: lower "
            "learner.lr (or federation.server_lr)", highlight=False
        )
    for line in (_kappa_line(summary), _class_line(summary), _never_right(summary),
                 _beaten_by(summary)):
        if line:
            Console().print(line, highlight=False, soft_wrap=True)
    if summary.get("shared_client_ids"):
        ids = ", ".join(map(str, summary["shared_client_ids"]))
        Console().print(
            f"[yellow]two devices answered as the same client[/yellow] (client {ids}): their "
            "reports were filed under one client id; give each device its own --client-id",
            highlight=False, soft_wrap=True,
        )
    if summary.get("drift_detection"):
        Console().print(_detection_line(summary["drift_detection"]), highlight=False,
                        soft_wrap=True)
    failed = summary["rounds"] - summary.get("rounds_aggregated", summary["rounds"])
    if failed:
        Console().print(
            f"[yellow]{failed} of {summary['rounds']} rounds were not aggregated[/yellow] "
            "(the global model stayed as it was):", highlight=False
        )
        for item in summary.get("aggregation_errors", []):
            rounds = ", ".join(map(str, item["first_rounds"]))
            more = item["rounds"] - len(item["first_rounds"])
            rounds += f" and {more} more" if more > 0 else ""
            Console().print(f"  {item['reason']} (round {rounds})", markup=False,
                            highlight=False, soft_wrap=True)
    if summary.get("secure_aggregation") and summary.get("rounds_aggregated", rounds):
        Console().print(
            f"Secure aggregation: the server saw only sums, "
            f"{summary['round_trips_per_round']:.2f} round trips a round "
            f"(Flower's SecAgg+ takes 4)."
        )
        clipped = summary.get("clipped_fraction") or 0.0
        if clipped >= CLIPPED_WARNING:
            Console().print(
                f"[yellow]{100 * clipped:.1f} % of the update coordinates were clipped"
                "[/yellow]: the updates lost their size; raise secure_aggregation.clip "
                "(clipped_coordinates per round in metrics.jsonl)", highlight=False
            )
    if summary.get("privacy"):
        line = _privacy_line(summary["privacy"], bool(summary.get("secure_aggregation")))
        Console().print(line, highlight=False, soft_wrap=True)


# The trivial predictors scored on the federation's own samples (client.metrics.References):
# their row's name, their accuracy's key in summary.json, the kappa against them, and why
# they can do well.
def _references() -> tuple[tuple[str, str, str, str], ...]:
    from fedstream.client.metrics import MAJORITY, NO_CHANGE  # numpy: not at start-up

    return (
        (NO_CHANGE, "no_change_accuracy", "kappa_temporal",
         "a label often repeats the one before (labels in runs, or one class most of "
         "the time), which repeating it exploits"),
        (MAJORITY, "majority_accuracy", "kappa_m", "one class dominates"),
    )


def _kappa(value: float | None) -> str:
    return "undefined (that predictor was always right)" if value is None else f"{value:.2f}"


def _kappa_line(summary: dict[str, Any]) -> str | None:
    """The kappas, when the run has them: accuracy alone hides what the data gives free."""
    if summary.get("prequential_accuracy") is None or summary.get("no_change_accuracy") is None:
        return None
    return (f"kappa_temporal {_kappa(summary.get('kappa_temporal'))}, kappa_m "
            f"{_kappa(summary.get('kappa_m'))} (against the no-change and majority "
            "predictors: 1 is perfect, 0 no better)")


def _class_line(summary: dict[str, Any]) -> str | None:
    """The class-aware scores besides balanced accuracy (a column of the table), and the
    class the model serves worst: on an imbalanced stream accuracy is mostly the common
    classes'."""
    per_class = summary.get("per_class")
    if not per_class or summary.get("balanced_accuracy") is None:
        return None
    kappa = summary.get("cohen_kappa")
    agreed = "undefined (one class only, always predicted)" if kappa is None else f"{kappa:.2f}"
    line = f"Cohen's kappa {agreed}, macro F1 {summary['macro_f1']:.2f}"
    occurred = {name: c for name, c in per_class.items() if c["recall"] is not None}
    if len(occurred) > 1:
        name, worst = min(occurred.items(), key=lambda kv: (kv[1]["recall"], -kv[1]["samples"]))
        line += (f"; weakest class {name!r}: recall {_pct(worst['recall'])} of "
                 f"{worst['samples']} samples")
    return line


RARE_NEVER_RIGHT = 0.01  # a class this share of the samples that is never right is named


def _never_right(summary: dict[str, Any]) -> str | None:
    """A warning naming the classes of at least 1 % of the samples the model never got
    right: its accuracy can look fine while it ignores them (a rare fault, a minority)."""
    per_class, seen = summary.get("per_class") or {}, summary.get("samples_seen") or 0
    missed = [(name, c["samples"]) for name, c in per_class.items()
              if c["samples"] >= RARE_NEVER_RIGHT * seen and c["samples"] and not c["right"]]
    if not missed:
        return None
    names = ", ".join(f"{name!r} ({n} samples, {_pct(n / seen)})" for name, n in missed)
    return (f"[yellow]the federated model never predicted class{'es' * (len(missed) > 1)} "
            f"{names} right[/yellow] (per_class in summary.json)")


def _beaten_by(summary: dict[str, Any]) -> str | None:
    """A warning naming each trivial predictor that did at least as well as the federated
    model: its accuracy alone would look like learning to anyone who did not compare."""
    ours = summary.get("prequential_accuracy")
    beaten = [(name, summary[key], kappa, why) for name, key, kappa, why in _references()
              if ours is not None and summary.get(key) is not None and summary[key] >= ours]
    if not beaten:
        return None
    names = " and the ".join(f"{name} predictor ({_pct(acc)})" for name, acc, _, _ in beaten)
    whys = "; ".join(f"{why} ({kappa} {_kappa(summary.get(kappa))})"
                     for _, _, kappa, why in beaten)
    return (f"[yellow]the federated model ({_pct(ours)}) did no better than the {names}"
            f"[/yellow] on the same samples: {whys}")


def _size(n: float) -> str:
    """Bytes as a reader wants them: 30.5 kB, not 0.0 MB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _privacy_line(p: dict[str, Any], secure: bool) -> str:
    """What the run's models cost in differential privacy (server/privacy.py), and against
    whom: in plaintext the server sees every update, so no bound holds against it."""
    from fedstream.server.privacy import holds_against_server

    z = f"noise multiplier {p['noise_multiplier']:.4g}"
    if p.get("target_epsilon"):
        z += f" (calibrated for epsilon {p['target_epsilon']:g})"
    how = f"{z}, clip {p['clip_norm']:g}, noise added by the {p['noise_at']}"
    if p.get("void") or p["epsilon"] is None:  # null: a deployment's older records
        why = p.get("void") or "no epsilon holds (a round was released without noise)"
        line = f"Differential privacy: no guarantee ({how}): {why}."
    else:  # releases: the rounds whose sum was seen (a failed round costs nothing)
        line = (f"Differential privacy: epsilon = {p['epsilon']:.3g} at delta = {p['delta']:g} "
                f"after {p['releases']} released round{'s' * (p['releases'] != 1)} (one "
                f"client's whole stream; {how}).")
        known = p.get("epsilon_known_cohorts")
        if known is not None and abs(known - p["epsilon"]) > 1e-3 * max(known, 1.0):
            who = "(the server does)" if secure else "and sees only the models"
            line += (f" For an observer who knows which clients each round drew {who}: "
                     f"epsilon = {known:.3g}.")
        if not holds_against_server(p["noise_at"], secure):
            if secure:  # noise_at = "server"
                seen, fix = "each round's sum without noise", 'noise_at = "clients"'
            elif p["noise_at"] == "server":
                seen, fix = "each update without noise", "secure aggregation"
            else:
                seen = "each update with only its own client's share of the noise"
                fix = "secure aggregation"
            line += f" The server sees {seen}: no bound holds against it ({fix} gives one)."
    if p.get("clipped_updates"):
        line += (f" {100 * p['clipped_updates']:.0f} % of the updates were clipped "
                 f"(median norm {p['median_norm']:.3g}).")
    return line


def _detection_line(d: dict[str, Any]) -> str:
    """The simulation's drift-detection score in one line (sim/detection.py)."""
    if d["false_alarms"] is None:  # a file's own drifts, if any, are unknown to fedstream
        n = d["alarms"]
        return (f"Drift detection: {n} alarm{'s' * (n != 1)}; the file's own drifts are "
                "unknown and none was put in (drift.kind), so none can be scored as found "
                "or false.")
    alarms = f"{d['false_alarms']} false alarm{'s' * (d['false_alarms'] != 1)}"
    if not d["client_drifts"]:
        return f"Drift detection: no client reached a drift; {alarms}."
    line = f"Drift detection: {d['detected']} of {d['client_drifts']} client drifts found"
    if d["delay_samples"]:
        line += (f" (median delay {d['delay_samples']['median']:g} samples, "
                 f"{d['delay_rounds']['median']:.1f} rounds)")
    return line + f", {d['missed']} missed; {alarms}."


CLIPPED_WARNING = 0.1  # share of clipped coordinates above which a run is told so


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the effective config, every default included."""
    typer.echo(to_toml(_load(config, set_, [])), nl=False)


def main() -> None:
    import fedstream.cli.deploy
    import fedstream.cli.feed  # noqa: F401  (registers feed)
    from fedstream.cli import main as cli  # this module, also when run as __main__

    try:
        cli.app(prog_name="fedstream")
    except SystemExit as done:
        feed_module = sys.modules.get("fedstream.client.feed")  # loaded by `feed` only
        if feed_module is not None and feed_module.still_reading():
            # `feed -` from a pipe that is still open (`tail -f ... |`): its reader thread
            # is blocked in a read holding stdin's lock, and the interpreter's shutdown
            # would abort on that lock (exit 134) instead of exiting with this code.
            sys.stdout.flush()
            sys.stderr.flush()
            code = done.code
            os._exit(0 if code is None else code if isinstance(code, int) else 1)
        raise


if __name__ == "__main__":
    sys.exit(main())
