"""Global evaluation of the aggregated model on a held-back slice of the stream."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from torch.nn import functional as F

from fedstream.client.arrival import round_end
from fedstream.client.scaling import RunningScaler
from fedstream.protocol.config import Config
from fedstream.protocol.models import build_model
from fedstream.server.rounds import EvaluateFn
from fedstream.sim.federation import federation


def make_evaluate(cfg: Config) -> EvaluateFn:
    fed = federation(cfg)
    model = build_model(
        cfg.learner.model, fed.feature_shape, fed.n_classes, hidden=cfg.learner.hidden
    )

    def evaluate(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        x, y = fed.holdout(round_end(server_round))  # the concept the round trained on
        inputs = torch.as_tensor(x)
        if cfg.learner.standardize:
            # The clients feed the model standardised features, with statistics the server
            # never sees: the held-back slice is standardised with its own, as a client
            # that had seen it would.
            scaler = RunningScaler(fed.feature_shape)
            scaler.update(x)
            inputs = scaler.transform(inputs)
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        with torch.no_grad():
            logits = model(inputs)
            target = torch.as_tensor(y)
            loss = F.cross_entropy(logits, target).item()
            acc = (logits.argmax(1) == target).float().mean().item()
        return {"accuracy": acc, "loss": loss, "examples": len(y)}

    return evaluate
