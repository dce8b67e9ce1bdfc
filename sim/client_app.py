"""The simulation's ClientApp: fedstream's client pipeline reading virtual streams.

This module is what every Ray worker imports, so it imports only the client side.
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Context
from flwr.clientapp import ClientApp

from fedstream.client.app import make_client_app
from fedstream.client.stream import ClientStream
from fedstream.protocol.config import Config, from_json, to_json
from fedstream.sim.availability import availability_mod, threads_mod
from fedstream.sim.federation import federation
from fedstream.sim.logs import quiet_flower


def virtual_stream(cfg: Config, ctx: Context) -> ClientStream:
    """The stream of the virtual client behind this Flower node (its partition id)."""
    partition = int(ctx.node_config["partition-id"])
    if partition >= cfg.federation.clients:
        raise ValueError(
            f"node with partition-id {partition}, but federation.clients is "
            f"{cfg.federation.clients}: start as many SuperNodes as clients "
            f"(flwr run . --federation-config num-supernodes={cfg.federation.clients})"
        )
    return federation(cfg).stream(partition)


class _PicklesAsConfig(ClientApp):
    """A ClientApp that pickles as its config.

    Flower's Ray backend sends the ClientApp along with every message; pickled by value,
    its closures drag in kilobytes and cost milliseconds per message. By reference to a
    cached factory it is a short string, and each worker builds the app once.
    """

    cfg_json = ""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_bound_client_app, (self.cfg_json,))


@lru_cache(maxsize=4)
def _bound_client_app(cfg_json: str) -> ClientApp:
    cfg = from_json(cfg_json)
    quiet_flower()  # in the Ray worker that unpickles it: the actor logs through flwr too
    mods = [threads_mod(cfg), availability_mod(cfg)]
    app = make_client_app(
        virtual_stream, cfg, mods=mods, app_class=_PicklesAsConfig, seed=cfg.seed
    )
    app.cfg_json = cfg_json  # type: ignore[attr-defined]
    return app


def sim_client_app(cfg: Config | None = None) -> ClientApp:
    """The simulation's ClientApp; without `cfg` it reads the config from the run config."""
    if cfg is None:
        return make_client_app(virtual_stream, None, mods=[threads_mod(), availability_mod()])
    return _bound_client_app(to_json(cfg))
