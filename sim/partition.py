"""Splitting data (or label distributions) across clients.

Two views of the same heterogeneity: ``partition`` assigns the rows of a real dataset to
clients, while ``class_priors`` produces per-client label distributions for synthetic
generators, which have no rows to split. Both support the usual federated schemes: IID,
Dirichlet label skew and pathological "shards" (each client sees only a few classes).

Returned index arrays are sorted within each client, so a dataset stored in time order
stays in time order when a client replays its part as a stream.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Scheme = Literal["iid", "dirichlet", "shards"]
_SCHEMES = ("iid", "dirichlet", "shards")
_MAX_TRIES = 100


def _check_clients(n_clients: int, n_samples: int) -> None:
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if n_samples < n_clients:
        raise ValueError(
            f"n_clients ({n_clients}) must not exceed the number of samples ({n_samples})"
        )


def _check_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    return arr


def _group(owner: np.ndarray, n_clients: int) -> list[np.ndarray]:
    """Indices owned by each client, ascending: one stable sort instead of a mask per client."""
    order = np.argsort(owner, kind="stable")
    bounds = np.cumsum(np.bincount(owner, minlength=n_clients))[:-1]
    return [part.astype(np.int64) for part in np.split(order, bounds)]


def iid(n_samples: int, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniformly random split into near-equal parts (sizes differ by at most one)."""
    _check_clients(n_clients, n_samples)
    return [np.sort(part) for part in np.array_split(rng.permutation(n_samples), n_clients)]


def _by_class(labels: np.ndarray) -> list[np.ndarray]:
    """Indices of each distinct label (any dtype), ascending, from one stable sort."""
    _, classes = np.unique(labels, return_inverse=True)
    classes = classes.reshape(-1)
    return _group(classes, int(classes.max()) + 1)


def _dirichlet_owner(
    members: list[np.ndarray], n_samples: int, alpha: float, rng: np.random.Generator, n: int
) -> np.ndarray:
    """One draw: each class spreads its samples over the ``n`` clients in Dir(alpha) shares."""
    owner = np.empty(n_samples, dtype=np.int64)
    for idx in members:
        counts = rng.multinomial(idx.size, rng.dirichlet(np.full(n, alpha)))
        owner[rng.permutation(idx)] = np.repeat(np.arange(n), counts)
    return owner


def dirichlet(
    labels: np.ndarray,
    n_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Label-skewed split: client shares of every class follow Dir(alpha).

    Small alpha gives each client a few dominant classes; large alpha approaches IID.
    Draws are repeated until every client holds at least ``min_size`` samples, because an
    empty client cannot train; hopeless settings fail after a bounded number of tries."""
    arr = _check_labels(labels)
    _check_clients(n_clients, arr.size)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be finite and > 0, got {alpha}")
    if min_size < 0 or min_size * n_clients > arr.size:
        raise ValueError(
            f"min_size ({min_size}) times n_clients ({n_clients}) exceeds the {arr.size} samples"
        )
    members = _by_class(arr)
    for _ in range(_MAX_TRIES):
        owner = _dirichlet_owner(members, arr.size, alpha, rng, n_clients)
        if np.bincount(owner, minlength=n_clients).min() >= min_size:
            return _group(owner, n_clients)
    raise ValueError(
        f"partition.alpha = {alpha}: no dirichlet split gave every one of {n_clients} "
        f"clients at least {min_size} sample(s) in {_MAX_TRIES} draws; raise "
        "partition.alpha, use fewer clients, or partition.scheme = \"iid\""
    )


def _shards_per_class(sizes: np.ndarray, n_shards: int) -> np.ndarray:
    """Spread ``n_shards`` over classes roughly in proportion to size: one shard per class,
    the rest by largest remainder on the spare samples (so no class gets more shards than
    samples and no shard is empty)."""
    spare = n_shards - sizes.size
    quota = spare * (sizes - 1) / max(int(sizes.sum()) - sizes.size, 1)
    extra = np.floor(quota).astype(np.int64)
    short = spare - int(extra.sum())
    if short:
        extra[np.argsort(-(quota - extra), kind="stable")[:short]] += 1
    return 1 + extra


def shards(
    labels: np.ndarray, n_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-IID split: every client gets ``shards_per_client`` single-class shards.

    Shards never straddle a class boundary, so a client sees at most ``shards_per_client``
    classes, and every class is cut into at least one shard, so no sample is dropped."""
    arr = _check_labels(labels)
    _check_clients(n_clients, arr.size)
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    members = _by_class(arr)
    sizes = np.array([idx.size for idx in members])
    n_shards = n_clients * shards_per_client
    if n_shards < sizes.size:
        raise ValueError(
            f"shards_per_client ({shards_per_client}) x n_clients ({n_clients}) must be at "
            f"least the number of classes ({sizes.size}) to cover every sample"
        )
    if n_shards > arr.size:
        raise ValueError(
            f"shards_per_client ({shards_per_client}) x n_clients ({n_clients}) exceeds the "
            f"{arr.size} samples: shards would be empty"
        )
    shard_of = np.empty(arr.size, dtype=np.int64)
    first = 0
    for idx, k in zip(members, _shards_per_class(sizes, n_shards).tolist(), strict=True):
        # k near-equal, non-empty shards (k <= idx.size) of a random order of the class
        shard_of[rng.permutation(idx)] = first + np.arange(idx.size) * k // idx.size
        first += k
    client_of_shard = rng.permutation(n_shards) // shards_per_client
    return _group(client_of_shard[shard_of], n_clients)


def partition(
    labels: np.ndarray,
    n_clients: int,
    scheme: Scheme,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split dataset rows across clients by ``scheme`` (seeded, hence reproducible)."""
    rng = np.random.default_rng(seed)
    arr = _check_labels(labels)
    if scheme == "iid":
        return iid(arr.size, n_clients, rng)
    if scheme == "dirichlet":
        return dirichlet(arr, n_clients, alpha, rng)
    if scheme == "shards":
        return shards(arr, n_clients, shards_per_client, rng)
    raise ValueError(f"scheme must be one of {_SCHEMES}, got {scheme!r}")


def _shard_classes(
    n_clients: int, n_classes: int, per_client: int, rng: np.random.Generator
) -> np.ndarray:
    """(n_clients, per_client) distinct classes per client covering every class when
    n_clients * per_client >= n_classes: client i takes ``per_client`` consecutive entries
    (cyclically) of a random class order, starting where the previous client stopped."""
    order = rng.permutation(n_classes)
    slots = np.arange(n_clients)[:, None] * per_client + np.arange(per_client)[None, :]
    return order[slots % n_classes][rng.permutation(n_clients)]


def class_priors(
    n_clients: int,
    n_classes: int,
    scheme: Scheme,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int = 0,
) -> np.ndarray:
    """(n_clients, n_classes) rows summing to 1, for generators: iid -> uniform; dirichlet ->
    Dir(alpha) rows; shards -> uniform over shards_per_client classes per client (capped at
    n_classes), every class covered when possible."""
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return np.full((n_clients, n_classes), 1.0 / n_classes)
    if scheme == "dirichlet":
        if not np.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be finite and > 0, got {alpha}")
        rows = rng.dirichlet(np.full(n_classes, alpha), size=n_clients)
        return rows / rows.sum(axis=1, keepdims=True)  # guards against rounding drift
    if scheme == "shards":
        if shards_per_client < 1:
            raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
        per_client = min(shards_per_client, n_classes)
        chosen = _shard_classes(n_clients, n_classes, per_client, rng)
        priors = np.zeros((n_clients, n_classes))
        np.put_along_axis(priors, chosen, 1.0 / per_client, axis=1)
        return priors
    raise ValueError(f"scheme must be one of {_SCHEMES}, got {scheme!r}")
