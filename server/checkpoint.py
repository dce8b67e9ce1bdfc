"""Checkpoints of the aggregator: everything a crashed server needs to carry on.

After every round the server writes the global model, the strategy (with its optimizer
state: FedAvgM's momentum, FedAdam's and FedYogi's moments), the round number and the
running totals. The file is written beside its final name, fsynced and renamed over it,
so a crash at any moment leaves either the previous checkpoint or the new one, whole.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

from fedstream.protocol.config import Config, to_dict
from fedstream.protocol.durable import write_durably
from fedstream.server.records import History

CHECKPOINT = "checkpoint.pkl"
RUN_CONFIG = "config.json"  # the config a run started with: what --resume must match
# What a resumed run may change: how long it goes on and where results are written. Any
# other key would silently not apply (the strategy and model come from the checkpoint) or
# break the devices mid-run (their spools hold the stream's features).
RESUMABLE = ("federation.rounds", "federation.round_timeout", "output.", "simulation.")


@dataclass
class Checkpoint:
    server_round: int  # the last round completed
    arrays: ArrayRecord
    strategy: Strategy
    history: History


def save(directory: Path, ckpt: Checkpoint) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / CHECKPOINT
    return write_durably(
        final, final.with_suffix(".tmp"),
        lambda fh: _Pickler(fh, protocol=pickle.HIGHEST_PROTOCOL).dump(ckpt),
    )


def load(directory: Path) -> Checkpoint | None:
    """The last checkpoint in `directory`, or None when there is none yet."""
    path = directory / CHECKPOINT
    if not path.exists():
        return None
    with path.open("rb") as fh:
        ckpt = pickle.load(fh)  # our own file, in the server's own state directory
    if not isinstance(ckpt, Checkpoint):
        raise ValueError(f"{path} is not a fedstream checkpoint")
    return ckpt


class _Pickler(pickle.Pickler):
    """Pickles a Flower `Array` as its four fields only.

    An Array that has been sent keeps its wire chunks (memoryviews of its data) in a
    cache, and a memoryview cannot be pickled: the model of a round that kept the
    previous one (it was sent that round) made every such checkpoint fail.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Array):
            return _array, (obj.dtype, tuple(obj.shape), obj.stype, bytes(obj.data))
        return NotImplemented


def _array(dtype: str, shape: tuple[int, ...], stype: str, data: bytes) -> Array:
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def remember_config(directory: Path, cfg: Config) -> None:
    """Keep the config a fresh run starts with, for `changes_on_resume`."""
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_dict(cfg), indent=1, sort_keys=True) + "\n"
    write_durably(directory / RUN_CONFIG, directory / (RUN_CONFIG + ".tmp"),
                  lambda fh: fh.write(text.encode()))


def run_config(directory: Path) -> dict[str, Any] | None:
    """The config the run in `directory` was last started with, as flat dotted keys; None
    when it kept none (a state directory older than `remember_config`)."""
    path = directory / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        return _flat(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: the run's config cannot be read: {exc}") from None


def changes_on_resume(directory: Path, cfg: Config) -> list[str]:
    """The keys whose values `cfg` changes from the run's own config, besides RESUMABLE
    ones (and besides `federation.rounds` only when no target epsilon was calibrated to
    them), as "key: run's value, given value". Empty when the run kept no config (a state
    directory older than this check)."""
    before = run_config(directory)
    if before is None:
        return []
    now = _flat(to_dict(cfg))
    # A noise level calibrated to a target epsilon is spread over the rounds planned: more
    # rounds would need more noise, and the rounds done had less.
    fixed_rounds = bool(before.get("privacy.enabled") and before.get("privacy.target_epsilon"))
    return [
        f"{key}: {json.dumps(before[key])} in the run, {json.dumps(now.get(key))} given"
        + (" (the noise was calibrated to privacy.target_epsilon over the run's rounds)"
           if key == "federation.rounds" else "")
        # Keys the run's version did not have yet (a newer fedstream) are not differences.
        for key in sorted(before)
        if before[key] != now.get(key)
        and (not key.startswith(RESUMABLE) or (key == "federation.rounds" and fixed_rounds))
    ]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
