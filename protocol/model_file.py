"""The trained global model as a file: `model.pt` in a results folder.

A run's point is its model, and it is used outside fedstream: in a notebook, a service, on
other hardware. So the file is a plain `torch.save` of tensors and plain values, which
`torch.load(path, weights_only=True)` reads without running any pickled code, and it
carries what rebuilding the module needs: the architecture, the input shape, and which
label each output is (the order fedstream gave the classes when it read the data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedstream.protocol.config import Config
from fedstream.protocol.durable import write_durably
from fedstream.protocol.models import BUILT_IN, build_model

FILE = "model.pt"
TMP = f".{FILE}.tmp"  # beside it while it is written
FORMAT = "fedstream-model/1"


@dataclass(frozen=True, eq=False)  # tensors have no single truth value
class SavedModel:
    """A global model and what it takes to use it."""

    state_dict: dict[str, torch.Tensor]
    model: str  # learner.model: logreg, mlp, cnn or package.module:factory
    hidden: tuple[int, ...]
    feature_shape: tuple[int, ...]
    classes: tuple[str, ...]  # classes[i] is the label output i scores
    features: tuple[str, ...]  # the input columns, in order (empty: not from a table)
    standardize: bool  # the clients standardised inputs with their own running statistics
    server_round: int  # the last round aggregated into it (0: the initial model)

    def build(self, device: str | torch.device = "cpu", trust_code: bool = False) -> nn.Module:
        """The module with these weights, in eval mode: `module(x).argmax(1)` indexes
        `classes`. A file that names a factory of yours (`package.module:factory`) is
        built only with `trust_code=True`: building imports that module and runs it, and
        the file, not its reader, names the module (loading the tensors runs no code)."""
        if self.model not in BUILT_IN and not trust_code:
            raise ValueError(
                f"this model file names the factory {self.model!r}: building it imports and "
                "runs that module's code. If you trust the file, pass trust_code=True"
            )
        module = build_model(self.model, self.feature_shape, len(self.classes),
                             hidden=self.hidden)
        module.load_state_dict(self.state_dict)
        return module.to(device).eval()


def save(
    out_dir: Path,
    arrays: ArrayRecord,
    cfg: Config,
    feature_shape: Sequence[int],
    classes: Sequence[str],
    features: Sequence[str] = (),
    server_round: int = 0,
) -> Path:
    """Write `out_dir/model.pt` whole or not at all (beside it, then renamed over it): a
    reader never sees half a model, even while a deployment replaces it every round."""
    record = {
        "format": FORMAT,
        "state_dict": arrays.to_torch_state_dict(),
        "model": cfg.learner.model,
        "hidden": [int(h) for h in cfg.learner.hidden],
        "feature_shape": [int(s) for s in feature_shape],
        "classes": [str(c) for c in classes],
        "features": [str(f) for f in features],
        "standardize": bool(cfg.learner.standardize),
        "server_round": int(server_round),
    }
    return write_durably(out_dir / FILE, out_dir / TMP, lambda fh: torch.save(record, fh))


def load(path: str | Path) -> SavedModel:
    """A saved model, from its file or from the results folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such model file (a finished `fedstream sim` or a deployment's "
            f"aggregator writes {FILE} into its results folder)"
        )
    try:
        record: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's unpickler raises many kinds
        raise ValueError(f"{path}: not a fedstream model file ({err})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path}: not a fedstream model file (format {found!r}, "
                         f"expected {FORMAT!r})")
    return SavedModel(
        state_dict=record["state_dict"],
        model=record["model"],
        hidden=tuple(record["hidden"]),
        feature_shape=tuple(record["feature_shape"]),
        classes=tuple(record["classes"]),
        features=tuple(record["features"]),
        standardize=record["standardize"],
        server_round=record["server_round"],
    )


def class_labels(classes: Sequence[str], n_classes: int) -> tuple[str, ...]:
    """The label of each output: the data's class names, or the class indices for a
    source that has none (synthetic streams, digits)."""
    return tuple(classes) if classes else tuple(str(i) for i in range(n_classes))
