"""The client side of differential privacy, as a Flower mod: clip -> noise.

The server asks for it in each train message (`dp-clip`, and `dp-noise-std` when the
clients add the noise): the mod clips the model change the handler trained to that L2
norm, adds the client's share of the Gaussian noise, and replies with the global model
plus that change. It sits inside the secure-aggregation mod, which then quantizes and
masks the privatised change: under secure aggregation the server never holds an update
without its noise. The reply says it weighs as much as every other client's
(`privatised`), since a weight that grows with the client's examples would let one
client move the sum by more than the clip. The server checks that every reply says so.

Noise comes from the operating system's entropy, so a server cannot predict it. A
simulation (virtual clients, the server in the same program) seeds it from the config
instead, so that a run repeats exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedstream.protocol import dp, updates
from fedstream.protocol import messages as m
from fedstream.protocol.config import PrivacyConfig

_NOISE_STREAM = 0xD9  # apart from the rounding of the same round (sources/base.py: key layouts)
PRIVATE_ONLY = "private-only"  # node config: what a device's own config has it do ("clip", "noise")
PRIVATE_CLIP = "private-clip"  # node config: the largest clip it accepts (its clip_norm)
PRIVATE_NOISE = "private-noise"  # node config: the least noise std it accepts, per unit of clip


class PrivacyRequired(RuntimeError):
    """The round asks less privacy of this device than its own config does."""


def requirement(cfg: PrivacyConfig, secure: bool) -> str:
    """What a device whose config is `cfg` must be asked to do in every round: "noise" (clip
    and add its share: the noise is the clients'), "clip" (the server adds the noise to a
    masked sum), or "" (nothing it could check: the server clips and noises in plaintext,
    or privacy is off). A server that asks less would train on its update unprotected."""
    if not cfg.enabled:
        return ""
    if cfg.noise_at == "clients" and (cfg.noise_multiplier > 0 or cfg.target_epsilon > 0):
        return "noise"
    return "clip" if secure or cfg.noise_at == "clients" else ""


def bounds(cfg: PrivacyConfig, noise_multiplier: float, clients: int) -> dict[str, float]:
    """The node config that holds a server to how much privacy a device's config asks for,
    not only to the kind: a clip no larger than its `clip_norm`, and (where the clients add
    the noise) a share of at least z / sqrt(clients) of the clip, the least an honest server
    of that config asks of a full cohort (a smaller cohort gets more)."""
    if not cfg.enabled:
        return {}
    limits = {PRIVATE_CLIP: cfg.clip_norm}
    if cfg.noise_at == "clients" and noise_multiplier > 0:
        limits[PRIVATE_NOISE] = noise_multiplier / clients**0.5
    return limits


def make_privacy_mod(seed: int | None = None) -> Mod:
    """The mod, with noise seeded from `seed` (simulation) or from the OS (devices)."""

    def privacy_mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        train = msg.metadata.message_type == MessageType.TRAIN
        config = m.record(msg.content, m.CONFIG, ConfigRecord) if train else None
        if train:
            _check_asked(config, ctx.node_config)
        if config is None or m.DP_CLIP not in config:
            return call_next(msg, ctx)
        reply = call_next(msg, ctx)
        if reply.has_error():
            return reply
        metrics = reply.content[m.METRICS]
        rng = round_rng(seed, int(config[m.ROUND]), int(metrics["client-id"]), _NOISE_STREAM)
        reply.content[m.ARRAYS] = privatised(
            msg.content[m.ARRAYS], reply.content[m.ARRAYS],
            clip=float(config[m.DP_CLIP]), std=float(config.get(m.DP_STD, 0.0)), rng=rng,
        )
        metrics[m.PRIVATISED] = 1
        return reply

    return privacy_mod


def _check_asked(config: ConfigRecord | None, own: Mapping[str, Any]) -> None:
    """Refuse a round that asks less privacy of this device than its node config (`own`,
    from `requirement` and `bounds`) holds it to."""
    need = str(own.get(PRIVATE_ONLY, ""))
    if not need:
        return
    clipped = config is not None and m.DP_CLIP in config
    std = float(config.get(m.DP_STD, 0.0)) if clipped else 0.0  # type: ignore[union-attr]
    if not clipped or (need == "noise" and not std > 0):
        asked = "neither clipping nor noise" if not clipped else "clipping but no noise"
        raise PrivacyRequired(
            f"this device trains only under differential privacy (its config enables it, "
            f"the {'noise added by the clients' if need == 'noise' else 'clients clipping'}"
            f"), and the round asked {asked}: the server's config has privacy.enabled = "
            "false, or another noise_at"
        )
    clip = float(config[m.DP_CLIP])  # type: ignore[index]
    most = float(own.get(PRIVATE_CLIP, math.inf))
    if not clip <= most * (1 + 1e-9):
        raise PrivacyRequired(
            f"the round asked this device to clip its update at {clip:g}, above its own "
            f"config's privacy.clip_norm = {most:g}: the server's config has another clip_norm"
        )
    least = float(own.get(PRIVATE_NOISE, 0.0))
    if need == "noise" and not std >= least * clip * (1 - 1e-9):
        raise PrivacyRequired(
            f"the round asked this device for noise of std {std:g} at clip {clip:g} "
            f"({std / clip:g} of the clip), less than its own config asks: {least:g} of the "
            "clip, its noise multiplier (privacy.noise_multiplier, or the one calibrated "
            "to privacy.target_epsilon) over the square root of federation.clients"
        )


def privatised(
    global_arrays: ArrayRecord,
    local_arrays: ArrayRecord,
    clip: float,
    std: float,
    rng: np.random.Generator,
) -> ArrayRecord:
    """The global model plus the clipped, noised change that training made to it."""
    change = dp.model_change(local_arrays, global_arrays)
    dp.clip_l2(change, clip)
    dp.add_noise(change, std, rng, dp.float_spans(global_arrays))
    return updates.shifted(global_arrays, change)


def round_rng(seed: int | None, server_round: int, client: int, stream: int) -> np.random.Generator:
    """A client's randomness for one round: from the OS on a device (no server can predict
    it), or from `seed` in a simulation (a run repeats); `stream` keeps uses apart."""
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng([seed, server_round, client, stream])
