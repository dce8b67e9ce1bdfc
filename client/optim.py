"""Optimizers and learning-rate schedules, built from the learner config.

Schedules are torch's own, so their state survives a round trip through `state_dict` and a
resumed learner continues the schedule where it left off.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, ExponentialLR, LRScheduler, StepLR

from fedstream.protocol.config import LearnerConfig


def make_optimizer(model: nn.Module, cfg: LearnerConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, cfg: LearnerConfig) -> LRScheduler | None:
    """One scheduler step per mini-batch: on a stream, batches are the only clock.

    A constant LR needs no scheduler, and skipping it saves its bookkeeping on every step.
    """
    if cfg.schedule == "step":
        return StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.schedule == "exponential":
        return ExponentialLR(optimizer, gamma=cfg.gamma)
    if cfg.schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=cfg.t_max)
    return None
