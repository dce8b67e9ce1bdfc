"""The `fedstream` command."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
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
    import os

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
    table.add_column("run")
    table.add_column("prequential accuracy", justify="right")
    table.add_column("samples", justify="right")
    table.add_row("federated", _pct(summary["prequential_accuracy"]), str(summary["samples_seen"]))
    for name, base in summary.get("baselines", {}).items():
        table.add_row(name, _pct(base["prequential_accuracy"]), str(base["samples_seen"]))
    for name, key, _, _ in _references():
        if summary.get(key) is not None:
            table.add_row(name, _pct(summary[key]), str(summary["samples_seen"]), style="dim")
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
    """The class-aware scores and the class the model serves worst: on an imbalanced stream
    accuracy is mostly the common classes'."""
    per_class = summary.get("per_class")
    if not per_class or summary.get("balanced_accuracy") is None:
        return None
    line = (f"balanced accuracy {_pct(summary['balanced_accuracy'])}, Cohen's kappa "
            f"{_kappa(summary.get('cohen_kappa'))}, macro F1 {summary['macro_f1']:.2f}")
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


@app.command()
def feed(
    file: Annotated[str, typer.Argument(metavar="FILE|-", help="CSV or JSONL file, - for stdin.")],
    to: Annotated[
        str,
        typer.Option("--to", help="Ingestion service: unix:///path.sock or 127.0.0.1:PORT."),
    ],
    label: Annotated[str, typer.Option("--label", help="Label column (or key).")] = "label",
    features: Annotated[
        list[str] | None,
        typer.Option("--features", help="Feature columns, comma-separated or repeated "
                     "(default: all but the label)."),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option("--classes", help="Class names in index order, comma-separated "
                     "(default: labels are integer class indices)."),
    ] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Rows per message.")] = 4096,
    fmt: Annotated[str, typer.Option("--format", help="auto, csv or jsonl.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    wait: Annotated[
        float,
        typer.Option("--wait", min=0, help="Seconds to wait for the ingestion service to come "
                     "up (a producer started beside its device); 0 fails at once."),
    ] = 0.0,
) -> None:
    """Push samples from a CSV or JSONL file (or stdin) into a device's ingestion service.

    Malformed rows are reported with file:line and skipped; the good rows are stored.
    Exit code 0: all stored; 2: malformed rows or bad input; 3: the spool was full
    (back-pressure: rows from the line named on were not stored), or its disk full; 1: service
    unreachable."""
    from array import array

    from tqdm import tqdm

    from fedstream.client.feed import Reader, open_input, still_reading
    from fedstream.client.ingest import IngestError, Producer
    from fedstream.client.sources import DataError
    from fedstream.protocol.runtime import Stopped, StopRequest, on_signals

    if fmt not in ("auto", "csv", "jsonl"):
        fail(f"--format must be auto, csv or jsonl, got {fmt!r}", 2)
    if problem := address_problem(to, "--to", unix=True):
        fail(problem, 2)
    wanted = [f.strip() for group in features or [] for f in group.split(",") if f.strip()]
    request = StopRequest()  # a stop while rows flow ends the input there, the stream whole
    # From the first read to the device's last reply, a stop says what was sent.
    with on_signals():
        try:
            stream, name = open_input(file)
            reader = Reader(
                stream, name, path=file, label=label, features=wanted or None, fmt=fmt,  # type: ignore[arg-type]
                classes=[c.strip() for c in classes.split(",")] if classes else None, batch=batch,
                stop=request,
            )
            chunks = reader.open()  # the header, before connecting
        except (DataError, ValueError) as e:
            fail(e, 2)
        except Stopped as e:  # e.g. a live pipe that has not sent its header yet
            err.print(f"stopped ({e}) before the input's first row: nothing was sent",
                      markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        lines = array("q")  # file line of every row sent, by stream position
        problems: list[str] = []
        malformed = 0
        fatal: list[Exception] = []
        bar = tqdm(unit=" rows", disable=True if quiet else None, file=sys.stderr)

        def batches() -> Any:
            nonlocal malformed
            try:
                for chunk in chunks:
                    malformed += len(chunk.errors)
                    problems.extend(chunk.errors[: max(0, 1000 - len(problems))])
                    bar.update(len(chunk.y) + len(chunk.errors))
                    if len(chunk.y):
                        lines.extend(chunk.lines.tolist())
                        yield chunk.x, chunk.y, None, None
            except (DataError, ValueError) as e:  # the input as a whole; rows before it are sent
                fatal.append(e)

        result, stopped = None, None
        try:
            with Producer(to) as producer:
                if wait:
                    producer.wait_ready(wait)
                width = producer.stats()["n_features"]
                _check_width(reader.features or wanted, width, name, to)
                with on_signals(STOPPING_FEED, soft=request):
                    result = producer.append_batches(batches())
        except Stopped as e:
            stopped = e
            if result is None:  # the device's reply did not come: say what was handed over
                bar.close()
                _stopped_mid_feed(e, lines, name, partial(_resume_from, reader, stream))
        except IngestError as e:
            bar.close()
            _failed_mid_feed(e, lines, name, partial(_resume_from, reader, stream), wait,
                             problems)
        finally:
            if not still_reading():  # else closing waits on the reader's lock (see main)
                stream.close()
    bar.close()
    ended = None
    if request.is_set():
        stopped = request
        # Only a stop that cut the input short has a line to go on from; a full spool
        # names its own (the first row refused), which comes before it.
        if reader.broke_off and result is not None and result.first_refused is None:
            resume = partial(_resume_from, reader, stream)
            ended = _ended_at(request, lines[: result.sent], name, resume)
    _report_feed(result, lines, problems, malformed, fatal, name, to, stopped, ended)


STOPPING_FEED = ("stopping: sending the rows already read, then the device says what it "
                 "stored (stop again to leave at once, not knowing which rows it stored)")


def _ended_at(request: Any, lines: Any, name: str, resume: Callable[[int], str]) -> str:
    """What a feed stopped mid-input tells: `lines` are the rows the device received (its
    reply counts them), and the input was read no further than the row after them."""
    said = f"stopped ({signal.Signals(request.signum).name}): "
    if not lines:
        return said + f"no row was sent: feed {name} again"
    return (said + f"the rows up to {name}:{lines[-1]} were sent, and the device's counts "
            f"above are for them; feed again from {resume(lines[-1] + 1)}")


def _stopped_mid_feed(e: Any, lines: Any, name: str, resume: Callable[[int], str]) -> NoReturn:
    """A feed stopped (Ctrl-C, SIGTERM) before the device replied: what was handed over,
    and the line to feed again from."""
    handed = len(lines)
    sent = f"{handed} rows were sent" + (f" (to {name}:{lines[-1]})" if handed else "")
    rest = (f"Rows after {name}:{lines[-1]} were not sent: feed again from "
            f"{resume(lines[-1] + 1)} (up to a few thousand rows before them were still in "
            "flight and may not be stored)") if handed else f"Feed {name} again"
    err.print(f"stopped ({e}): {sent}; the device stored those it received before the "
              f"stop. {rest}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(e.exit_code) from None


def _failed_mid_feed(
    e: Any, lines: Any, name: str, resume: Callable[[int], str], wait: float,
    problems: list[str],
) -> NoReturn:
    """The device could not be reached, went away, or could not store (a full disk):
    what it kept, and the line to feed again from."""
    if e.handled is not None:  # its spool could not store: it said from which row on
        for problem in sorted(problems, key=_line_of)[:20]:  # rows this feed refused
            err.print(f"[red]error:[/red] {escape(problem)}", highlight=False, soft_wrap=True)
        if not lines:
            fail(f"{e}\nno row was stored: feed {name} again once the device has room", 3)
        first = lines[e.handled] if e.handled < len(lines) else lines[-1] + 1
        fail(f"{e}\nthe rows before {name}:{first} were stored, but for malformed ones; "
             f"{name}:{first} and the rows after it were not. Once the device has room, "
             f"feed again from {resume(first)}", 3)
    if e.sent:  # it went away mid-stream: say what was sent and where to go on
        last = lines[e.sent - 1]
        fail(f"{e}\nthe device went away during the feed: {e.sent} rows were sent (to "
             f"{name}:{last}); it stored those it had received, and rows after "
             f"{name}:{last} were not sent. Once it is up, feed again from "
             f"{resume(last + 1)}; the last rows sent before it went away may not be stored "
             "either", 1)
    hint = "" if wait else " (is its device up? --wait S waits for it)"
    fail(f"{e}{hint}", 1)


def _report_feed(
    result: Any, lines: Any, problems: list[str], malformed: int, fatal: list[Exception],
    name: str, to: str, stopped: Any, ended: str | None = None,
) -> None:
    """The device's reply: counts on stdout, the first problems on stderr, and the exit
    code the docstring of `feed` gives."""
    for error in result.errors:
        room = max(0, 1000 - len(problems))
        for index in range(error.index, error.index + min(error.count, room)):
            problems.append(f"{name}:{lines[index]}: {error.reason}")
    malformed += result.rejected
    problems.sort(key=_line_of)
    typer.echo(
        f"{result.accepted} accepted, {result.dropped} dropped, {result.refused} refused "
        f"(spool full), {malformed} malformed; {to}"
    )
    for problem in [*problems[:20], *map(str, fatal)]:
        err.print(f"[red]error:[/red] {escape(problem)}", highlight=False, soft_wrap=True)
    if malformed > min(20, len(problems)):
        err.print(f"... and {malformed - min(20, len(problems))} more malformed rows")
    if result.first_refused is not None:
        err.print(
            f"[red]spool full:[/red] rows from {escape(name)}:{lines[result.first_refused]} "
            "on were not stored (back-pressure), nor was the rest of the input read; "
            "feed them again later",
            highlight=False, soft_wrap=True,
        )
    if ended:
        err.print(ended, markup=False, highlight=False, soft_wrap=True)
    if result.first_refused is not None:  # back-pressure: the line above is where to go on
        raise typer.Exit(3)
    if stopped is not None:  # it came once the device had replied: the report is whole
        raise typer.Exit(stopped.exit_code)
    if malformed or fatal:
        raise typer.Exit(2)
    if result.refused:
        raise typer.Exit(3)


def _resume_from(reader: Any, stream: Any, line: int) -> str:
    """Where a stopped feed goes on, with a command that keeps a CSV's header (line
    numbers count every line of the input, as an editor's do)."""
    import gzip

    cat = "zcat FILE" if isinstance(getattr(stream, "buffer", None), gzip.GzipFile) else (
        "cat FILE")
    if reader.kind == "csv":
        head = reader.header_line
        return (f"line {line}, after the header (line {head}): e.g. "
                f"`{cat} | sed -n '{head}p;{line},$p'`")
    return f"line {line}: e.g. `{cat} | tail -n +{line}`"


def _check_width(features: list[str], width: int, name: str, to: str) -> None:
    """Columns that cannot fit the device: said once, before any row is sent (the device
    would refuse every row). A JSONL input's keys are known here only from --features;
    without it, each row's are checked as it comes."""
    if features and len(features) != width:
        shown = ", ".join(repr(f) for f in features[:8]) + (", ..." if len(features) > 8 else "")
        fail(f"{name}: its rows have {len(features)} features ({shown}), and the device at "
             f"{to} stores samples of {width}: name the {width} feature columns, in the "
             "order the device's other producers use, with --features (nothing was sent)", 2)


def _line_of(problem: str) -> int:
    """The line number in a "file:line: message" problem (for ordering)."""
    head = problem.split(": ", 1)[0]
    number = head.rsplit(":", 1)[-1]
    return int(number) if number.isdigit() else 0


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the effective config, every default included."""
    typer.echo(to_toml(_load(config, set_, [])), nl=False)


def main() -> None:
    import fedstream.cli.deploy  # noqa: F401  (registers certs, server and client)
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
