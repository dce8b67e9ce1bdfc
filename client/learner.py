"""The on-device learner: model, optimizer, LR schedule and drift detector of one client.

It walks a client's stream test-then-train: each mini-batch is first predicted and scored,
then learned. Its state between rounds (optimizer, schedule, detector, metric, stream
offset; not the weights, which every round takes from the global model) serialises to
bytes, because in deployment every round runs in a fresh process and only what is
committed survives.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedstream.client.detectors import DriftDetector, detections, make_detector
from fedstream.client.device import pick_device
from fedstream.client.metrics import Prequential, References, RoundOutcome, class_tally
from fedstream.client.optim import make_optimizer, make_schedule
from fedstream.client.scaling import RunningScaler
from fedstream.protocol.config import DetectorConfig, LearnerConfig
from fedstream.protocol.models import build_model


@dataclass(frozen=True)
class Spec:
    """What the learner must know about its stream and run to build itself."""

    feature_shape: tuple[int, ...]
    n_classes: int
    learner: LearnerConfig
    detector: DetectorConfig
    fading: float = 0.99
    seed: int = 0


class Learner:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        cfg = spec.learner
        self.device = pick_device(cfg.device)
        self.model = build_model(
            cfg.model, spec.feature_shape, spec.n_classes, hidden=cfg.hidden, seed=spec.seed
        ).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg)
        self.schedule = make_schedule(self.optimizer, cfg)
        self.detector = _detector(spec.detector)
        self.metric = Prequential(fading=spec.fading)
        self.references = References.new(spec.n_classes)
        self.scaler = RunningScaler(spec.feature_shape) if cfg.standardize else None
        self.offset = 0  # stream position of the first sample not yet learned
        self.boost_left = 0  # mini-batches still trained at a raised LR after a drift
        self.window_x: torch.Tensor | None = None  # batch mode: recent samples
        self.window_y: torch.Tensor | None = None
        self._scored: list[tuple[torch.Tensor, torch.Tensor]] = []  # predictions, losses
        # BatchNorm cannot train on one sample (no variance): such a model never gets a
        # batch of one, and a lone sample is only scored.
        self._batch_stats = any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                for m in self.model.modules())
        # Dropout in a training forward would score a random sub-network: such a model
        # scores in a forward of its own, in eval mode, before the one it learns from.
        self._dropout = any(isinstance(m, nn.modules.dropout._DropoutNd)
                            for m in self.model.modules())

    # ------------------------------------------------------------------ weights
    def get_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights, strict=True)

    # ----------------------------------------------------------------- learning
    def learn(self, x: np.ndarray, y: np.ndarray) -> RoundOutcome:
        """Test-then-train over newly arrived samples, in arrival order."""
        outcome = RoundOutcome(classes=class_tally(y[:0], y[:0], self.spec.n_classes))
        if len(y) == 0:
            return outcome
        if self.scaler is not None:
            self.scaler.update(x)  # features only: the round's samples are all here
        xt = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        yt = torch.as_tensor(y, dtype=torch.long, device=self.device)
        self._scored = []
        if self.spec.learner.mode == "online":
            self._online(xt, yt, outcome)
        else:
            self._batch(xt, yt, outcome)
        # Bookkeeping once per round, vectorised, rather than once per mini-batch.
        predicted = torch.cat([p for p, _ in self._scored]).cpu().numpy()
        losses = torch.cat([loss for _, loss in self._scored]).cpu().numpy()
        correct = predicted == y
        outcome.add(correct, losses)
        outcome.classes = class_tally(y, predicted, self.spec.n_classes)
        outcome.no_change_correct, outcome.majority_correct = self.references.score(y)
        self.metric.update(correct, losses)
        self.offset += len(y)
        return outcome

    def _online(self, x: torch.Tensor, y: torch.Tensor, outcome: RoundOutcome) -> None:
        for start, stop in self._spans(len(y)):
            xb, yb = x[start:stop], y[start:stop]
            lone = self._batch_stats and len(yb) == 1
            scored = self._predicted(xb) if self._dropout else None
            self.model.train(not lone)
            # Without dropout one forward serves both: the prediction is taken before this
            # batch's update.
            logits = self.model(self._scaled(xb))
            losses = F.cross_entropy(logits, yb, reduction="none")
            if scored is None:
                self._record(logits.argmax(1), yb, losses, outcome, self.offset + start)
            else:
                scored_losses = F.cross_entropy(scored, yb, reduction="none")
                self._record(scored.argmax(1), yb, scored_losses, outcome, self.offset + start)
            if not lone:
                self._step(losses.mean())

    def _predicted(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        with torch.no_grad():
            return self.model(self._scaled(x))

    def _spans(self, n: int) -> list[tuple[int, int]]:
        """Mini-batch bounds over `n` samples; with batch statistics, a last batch of one
        joins the batch before it."""
        bs = self.spec.learner.batch_size
        spans = [(start, min(start + bs, n)) for start in range(0, n, bs)]
        if self._batch_stats and len(spans) > 1 and spans[-1][1] - spans[-1][0] == 1:
            spans[-2:] = [(spans[-2][0], n)]
        return spans

    def _batch(self, x: torch.Tensor, y: torch.Tensor, outcome: RoundOutcome) -> None:
        cfg = self.spec.learner
        self.model.eval()
        with torch.no_grad():
            for start in range(0, len(y), cfg.batch_size):
                xb, yb = x[start : start + cfg.batch_size], y[start : start + cfg.batch_size]
                logits = self.model(self._scaled(xb))
                losses = F.cross_entropy(logits, yb, reduction="none")
                self._record(logits.argmax(1), yb, losses, outcome, self.offset + start)
        self._extend_window(x, y)
        assert self.window_x is not None and self.window_y is not None
        self.model.train()
        n = len(self.window_y)
        # Shuffles are seeded by stream position, so they need no state of their own.
        rng = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + self.offset)
        if self._batch_stats and n == 1:
            return  # nothing a BatchNorm model can train on yet
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=rng).to(self.device)
            for start, stop in self._spans(n):
                idx = order[start:stop]
                logits = self.model(self._scaled(self.window_x[idx]))  # raw in the window
                self._step(F.cross_entropy(logits, self.window_y[idx]))

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.scaler is None else self.scaler.transform(x)

    def _extend_window(self, x: torch.Tensor, y: torch.Tensor) -> None:
        keep = self.spec.learner.window
        if self.window_x is None or self.window_y is None:
            self.window_x, self.window_y = x[-keep:], y[-keep:]
        else:
            self.window_x = torch.cat([self.window_x, x])[-keep:]
            self.window_y = torch.cat([self.window_y, y])[-keep:]

    def _step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        if self.boost_left:
            self.boost_left -= 1
            if not self.boost_left:
                self._scale_lr(1.0 / self.spec.detector.boost)

    def _record(
        self,
        predicted: torch.Tensor,
        y: torch.Tensor,
        losses: torch.Tensor,
        outcome: RoundOutcome,
        position: int,
    ) -> None:
        self._scored.append((predicted.detach(), losses.detach()))
        if self.spec.detector.kind == "none":
            return
        correct = predicted == y
        # Detectors are sequential by nature: one 0/1 error per prediction gives them the
        # statistical power that a per-batch mean would throw away.
        found = detections(self.detector, (~correct).float().tolist())
        outcome.drifts.extend(position + i for i in found)
        if found:
            self._react()

    def _react(self) -> None:
        """Respond to detected drift: forget stale momentum, or learn faster for a while."""
        reaction = self.spec.detector.reaction
        if reaction == "reset_optimizer":
            self.optimizer.state.clear()
        elif reaction == "boost_lr":
            if not self.boost_left:
                self._scale_lr(self.spec.detector.boost)
            self.boost_left = self.spec.detector.boost_batches

    def _scale_lr(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
        # Keep the schedule's notion of the base LR in step, so boosts compose with it.
        if self.schedule is not None:
            self.schedule.base_lrs = [lr * factor for lr in self.schedule.base_lrs]

    # -------------------------------------------------------------------- state
    def state_bytes(self) -> bytes:
        """Everything needed to continue where this learner stopped, except the weights.

        Every round starts from the global model, so the local weights are not state; the
        rest (optimizer, schedule, detector, metric, stream offset, window, feature
        statistics) is about a kilobyte. Tensors travel as numpy arrays in a pickle: a round
        trip costs tens of microseconds, where `torch.save`'s zip container costs about a
        millisecond.
        """
        return pickle.dumps(
            _to_numpy(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "schedule": None if self.schedule is None else self.schedule.state_dict(),
                    "detector": self.detector.state_dict(),
                    "metric": self.metric.state_dict(),
                    "references": self.references.state_dict(),
                    "offset": self.offset,
                    "boost_left": self.boost_left,
                    "window": (self.window_x, self.window_y),
                    "scaler": None if self.scaler is None else self.scaler.state_dict(),
                }
            ),
            protocol=pickle.HIGHEST_PROTOCOL,
        )

    def load_state_bytes(self, blob: bytes) -> None:
        state = pickle.loads(blob)
        saved = state.pop("references", None)  # numpy counts: no round trip through torch
        state = _to_torch(state, self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
        self.detector.load_state_dict(state["detector"])
        self.metric = Prequential.from_state(state["metric"])
        # Kept as saved when they count this model's classes; a state saved before they
        # were kept, or under another stream.n_classes, starts them afresh (its labels
        # could not index the counts, and every round would fail).
        if saved is not None and len(saved["counts"]) == self.spec.n_classes:
            self.references = References.from_state(saved)
        self.offset = int(state["offset"])
        self.boost_left = int(state["boost_left"])
        self.window_x, self.window_y = state["window"]
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])


def _detector(cfg: DetectorConfig) -> DriftDetector:
    if cfg.kind == "adwin":
        return make_detector("adwin", delta=cfg.delta, direction=cfg.direction)
    if cfg.kind == "page_hinkley":
        return make_detector("page_hinkley", delta=cfg.delta, threshold=cfg.threshold)
    return make_detector("none")


def _to_numpy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_numpy(v) for v in obj)
    return obj


def _to_torch(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj).to(device)
    if isinstance(obj, dict):
        return {k: _to_torch(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_torch(v, device) for v in obj)
    return obj
