"""Model architectures: the one thing besides the config that server and clients must agree on.

The server needs the initial global weights and clients need the same state-dict layout, so
the architecture lives here rather than on either side.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
from torch import nn


def logistic_regression(feature_shape: Sequence[int], n_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat(feature_shape), n_classes))


def mlp(feature_shape: Sequence[int], n_classes: int, hidden: Sequence[int] = (64,)) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = _flat(feature_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def small_cnn(feature_shape: Sequence[int], n_classes: int, channels: int = 16) -> nn.Module:
    """Two conv blocks and a linear head: enough for 8x8 to 32x32 images on a CPU."""
    if len(feature_shape) != 3:
        shape = tuple(feature_shape)
        raise ValueError(f"cnn needs (channels, height, width) input, got shape {shape}")
    c, h, w = feature_shape
    return nn.Sequential(
        nn.Conv2d(c, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d((max(1, h // 4), max(1, w // 4))),
        nn.Flatten(),
        nn.Linear(2 * channels * max(1, h // 4) * max(1, w // 4), n_classes),
    )


BUILT_IN = ("logreg", "mlp", "cnn")  # built without importing anything a name names


def build_model(
    name: str,
    feature_shape: Sequence[int],
    n_classes: int,
    *,
    hidden: Sequence[int] = (64,),
    seed: int = 0,
) -> nn.Module:
    """Build a model with seeded initial weights, so every party starts from the same point.

    `name` is logreg, mlp, cnn, or `package.module:factory` for a user model; a factory is
    called as `factory(feature_shape, n_classes)` and must return an `nn.Module`.
    """
    with torch.random.fork_rng(devices=[]):
        # Only the CPU generator initialises weights; torch.manual_seed would also seed
        # every accelerator backend, which costs milliseconds on every client message.
        torch.default_generator.manual_seed(seed)
        if name == "logreg":
            return logistic_regression(feature_shape, n_classes)
        if name == "mlp":
            return mlp(feature_shape, n_classes, hidden)
        if name == "cnn":
            return small_cnn(feature_shape, n_classes)
        return _user_model(name, feature_shape, n_classes)


def _user_model(spec: str, feature_shape: Sequence[int], n_classes: int) -> nn.Module:
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:  # checked before anything is imported
        raise ValueError(
            f"learner.model '{spec}': not a built-in model (logreg, mlp, cnn) nor a "
            "'package.module:factory' of yours"
        )
    if module_name == "__main__":  # found in the script that starts the run, not in a worker
        raise ValueError(
            f"learner.model '{spec}': a factory in the script being run cannot be imported by "
            "the clients' worker processes; put it in a module of its own (mymodels.py, "
            f"next to the script) and name it 'mymodels:{attr}'"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:  # ValueError: no module name
        raise ValueError(f"learner.model '{spec}': cannot load factory ({err})") from None
    try:
        model = factory(tuple(feature_shape), n_classes)
    except Exception as err:  # the user's code: say whose it is, not a deep traceback
        raise ValueError(
            f"learner.model '{spec}': calling {attr}({tuple(feature_shape)}, {n_classes}) "
            f"raised {type(err).__name__}: {err}"
        ) from err
    if not isinstance(model, nn.Module):
        raise ValueError(f"learner.model '{spec}' returned {type(model).__name__}, not nn.Module")
    return _materialized(model, spec, feature_shape)


def _materialized(model: nn.Module, spec: str, feature_shape: Sequence[int]) -> nn.Module:
    """A model with lazy layers (`nn.LazyLinear`...) shaped by one forward of zeros.

    Lazy weights exist only after a first batch, but the global model's are sent before
    any client has seen one. Shaped here, under the caller's seeded generator, every party
    builds the same weights.
    """
    lazy = (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)
    if not any(isinstance(t, lazy) for t in (*model.parameters(), *model.buffers())):
        return model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((2, *feature_shape)))
    except Exception as err:
        raise ValueError(
            f"learner.model '{spec}' has lazy layers, and a batch of shape "
            f"{(2, *feature_shape)} that would shape them raised {type(err).__name__}: {err}"
        ) from None
    finally:
        model.train(was_training)
    return model


def check_outputs(
    model: nn.Module, spec: str, feature_shape: Sequence[int], n_classes: int
) -> None:
    """A model must give one score per class: a user factory with another output size
    would otherwise load, and fail every client in its first round."""
    was_training = model.training
    model.eval()  # BatchNorm and dropout: a batch of two zeros is no training batch
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *feature_shape)))
    except Exception as err:
        raise ValueError(
            f"learner.model '{spec}': a batch of shape {(2, *feature_shape)} raised "
            f"{type(err).__name__}: {err}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"learner.model '{spec}' returns a {type(out).__name__} for a batch: its forward "
            f"must return one tensor of class scores, of shape (2, {n_classes})"
        )
    if not out.is_floating_point():
        raise ValueError(
            f"learner.model '{spec}' gives {out.dtype} outputs: class scores (logits) must be "
            "floating point, for the softmax and its gradient"
        )
    if tuple(out.shape) != (2, n_classes):
        raise ValueError(
            f"learner.model '{spec}' gives outputs of shape {tuple(out.shape)} for a batch of "
            f"2: it must give one score per class, (2, {n_classes})"
        )


def _flat(shape: Sequence[int]) -> int:
    size = 1
    for s in shape:
        size *= int(s)
    return size
