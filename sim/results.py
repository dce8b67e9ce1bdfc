"""The results folder: config.toml, metrics.jsonl (written live by the server), summary.json,
the final model and plots. Its layout is a contract other tools read; see the README.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from fedstream.protocol import model_file
from fedstream.protocol.config import Config, ConfigError, to_toml, validate
from fedstream.server.records import AccuracySeries, History, federated_series, run_summary
from fedstream.sim.detection import client_drift_times, detection_report, drifts_in_run

OWNED = ("summary.json", "metrics.jsonl", model_file.FILE, model_file.TMP,
         "plots/accuracy.png", "plots/clients.png", "plots/privacy.png")
MARK = "# The config of the run whose results are in this folder: `fedstream sim --config "


LOCK = ".fedstream.lock"  # held (flock) by the run writing into the folder, with its pid


class ResultsFolderBusy(ValueError):
    """Another run is writing into this results folder."""


@contextlib.contextmanager
def claimed(out: Path) -> Iterator[None]:
    """Hold the results folder for one run: a second run into it at the same time would
    mix both runs' rounds in one metrics.jsonl and leave one's summary beside the other's
    config. The lock goes with the process, however it ends (kill -9 included)."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock(fd, out)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def check_free(out: Path) -> None:
    """Refuse now, before any data is read, a folder another run is writing into."""
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(out / LOCK, os.O_RDONLY)
        try:
            _lock(fd, out)
        finally:
            os.close(fd)


def _lock(fd: int, out: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        if pid == str(os.getpid()):
            # This process's own earlier run (stopped): a child it forked may still hold
            # the inherited lock for a moment. One process runs one simulation at a time.
            return
        raise ResultsFolderBusy(
            f"output.dir: {out} is in use by another fedstream run (pid {pid}): wait for it "
            "to end, or give this run another --out"
        ) from None


def prepare(cfg: Config) -> Path:
    """The results folder, holding nothing of an earlier run: a file this run does not
    write (a plot it does not draw) would otherwise sit beside its results as if it
    were one of them. Files fedstream does not write are left alone.

    Its config.toml names the folder by its absolute path, so that running it again from
    anywhere writes into this same folder."""
    check_config_file(cfg)
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in OWNED:
        (out / name).unlink(missing_ok=True)
    own = cfg.model_copy(update={
        "output": cfg.output.model_copy(update={"dir": str(out.resolve())})
    })
    (out / "config.toml").write_text(
        f"{MARK}{out.resolve() / 'config.toml'}` runs it again, into this folder.\n"
        + to_toml(own)
    )
    return out


def check_config_file(cfg: Config) -> None:
    """A config.toml in the results folder that fedstream did not write is someone's own
    (a config kept beside its results, `--out` its folder): a run must not replace it."""
    out = Path(cfg.output.dir)
    path = out / "config.toml"
    try:
        text = path.read_text()
    except (OSError, UnicodeError):
        # No config of a run: a results file here is someone else's (every run writes its
        # config.toml first), and replacing it would lose it.
        theirs = [name for name in OWNED if (out / name).exists()]
        if theirs and not path.exists():
            raise ValueError(
                f"output.dir: {out.resolve()} holds {', '.join(theirs)} but no config.toml "
                "of a `fedstream sim` run (a `fedstream server` results folder, or files of "
                "your own), which a run would replace. Give another output.dir (--out), or "
                "move them"
            ) from None
        return
    # An earlier fedstream wrote no header: its config is a whole dumped config beside the
    # run's records. A dumped config alone is `fedstream config show`'s: someone's own.
    if text.startswith(MARK) or (_canonical(text) and (out / "metrics.jsonl").exists()):
        return
    raise ValueError(
        f"output.dir: {path} is not a config a run wrote (your own config?), and a run "
        "writes its config there: give another output.dir (--out), or move the file"
    )


def _canonical(text: str) -> bool:
    """Written by an earlier fedstream (before the header line): a whole config, exactly
    as it dumps one."""
    try:
        return to_toml(validate(tomllib.loads(text))) == text
    except (ConfigError, ValueError):  # TOMLDecodeError is a ValueError
        return False


def summarize(
    cfg: Config,
    history: History,
    wall_seconds: float,
    baselines: dict[str, AccuracySeries],
    final_eval: dict[str, float] | None = None,
    records: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    records = records or []
    federated = federated_series(records)  # per round, as the baselines have it
    summary: dict[str, Any] = {
        **run_summary(cfg, history, _class_names(cfg)),
        "wall_seconds": wall_seconds,
        "accuracy_per_round": federated.per_round,  # null: a round with no prediction
        "cumulative_accuracy": federated.cumulative,
        "drift_times": drifts_in_run(cfg),  # later (or earlier) ones were never seen
    }
    if cfg.drift.kind != "none" and cfg.drift.stagger > 0:  # each client's own, by id
        summary["client_drift_times"] = client_drift_times(cfg)
    detection = detection_report(cfg, records)
    if detection is not None:
        summary["drift_detection"] = detection
    names = _client_names(cfg)
    if names:  # partition.column: which site (device, user) each client is
        summary["client_names"] = list(names)  # by client id
    if final_eval:
        summary["global_eval"] = final_eval
    if baselines:
        summary["baselines"] = {name: b.to_dict() for name, b in baselines.items()}
    return summary


def save_model(cfg: Config, arrays: ArrayRecord, history: History) -> Path:
    """The final global model, with its classes in output order and its input columns."""
    from fedstream.client.arrival import round_end
    from fedstream.client.sources.relabel import Relabel
    from fedstream.sim.federation import HOLDOUT_CLIENT, federation

    fed = federation(cfg)
    data = fed.dataset
    classes = _class_names(cfg)
    source = fed.source(HOLDOUT_CLIENT)
    if isinstance(source, Relabel):  # a file's drift renames the classes: as they end
        classes = tuple(source.label_names(classes, round_end(history.rounds)))
    return model_file.save(
        Path(cfg.output.dir), arrays, cfg, fed.feature_shape, classes,
        data.features if data else (), server_round=history.rounds,
    )


def _class_names(cfg: Config) -> tuple[str, ...]:
    """The model's outputs by name, as the data names them before any drift relabels."""
    from fedstream.sim.federation import federation

    fed = federation(cfg)
    data = fed.dataset
    named = data.classes if data and data.classes else cfg.stream.classes
    return model_file.class_labels(named, fed.n_classes)


def _client_names(cfg: Config) -> tuple[str, ...]:
    from fedstream.sim.federation import federation  # the data: only for a column split

    if cfg.partition.scheme != "column":
        return ()
    dataset = federation(cfg).dataset
    return dataset.client_names if dataset is not None else ()

