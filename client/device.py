"""Pick where the learner computes: the fastest device present unless the config names one."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=8)
def pick_device(preference: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU; an explicit preference that is absent is an error."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"learner.device is '{preference}' but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"learner.device is '{preference}' but MPS is not available here")
    return device
