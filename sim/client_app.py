"""The simulation's ClientApp: fedstream's client pipeline reading virtual streams.

This module is what every Ray worker imports, so it imports only the client side.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedstream.client.app import make_client_app
from fedstream.client.stream import ClientStream
from fedstream.protocol.config import Config, from_json, from_run_config, to_json
from fedstream.sim.availability import availability_mod, threads_mod
from fedstream.sim.federation import federation
from fedstream.sim.logs import quiet_flower
from fedstream.sim.table_cache import ENV as CACHE_ENV
from fedstream.sim.table_cache import cache_dir


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
    """A ClientApp that pickles as its config, and the driver's table-cache folder.

    Flower's Ray backend sends the ClientApp along with every message; pickled by value,
    its closures drag in kilobytes and cost milliseconds per message. By reference to a
    cached factory it is a short string, and each worker builds the app once. The cache
    folder goes along because the workers of a cluster fedstream joins do not inherit the
    driver's environment: they would parse the file again into a cache of their own,
    and fail once it had moved.
    """

    cfg_json = ""
    tables = ""

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (_bound_client_app, (self.cfg_json, self.tables))


def _tables_here() -> str:
    """This process's table-cache folder, as `FEDSTREAM_CACHE_DIR` would name it."""
    folder = cache_dir()
    return "off" if folder is None else str(folder.resolve())


@lru_cache(maxsize=4)
def _bound_client_app(cfg_json: str, tables: str = "") -> ClientApp:
    if tables:  # in a worker: the driver's cache folder
        os.environ[CACHE_ENV] = tables
    cfg = from_json(cfg_json)
    quiet_flower()  # in the Ray worker that unpickles it: the actor logs through flwr too
    mods = [threads_mod(cfg), availability_mod(cfg)]
    app = make_client_app(
        virtual_stream, cfg, mods=mods, app_class=_PicklesAsConfig, seed=cfg.seed
    )
    app.cfg_json = cfg_json  # type: ignore[attr-defined]
    app.tables = tables or _tables_here()  # type: ignore[attr-defined]
    return app


def sim_client_app(cfg: Config | None = None) -> ClientApp:
    """The simulation's ClientApp; without `cfg` (`flwr run .`) it reads the config from
    each message's run config and hands the message to that config's bound app, the very
    app `fedstream sim` runs: seeded, so that noise and rounding repeat as they do there."""
    if cfg is not None:
        return _bound_client_app(to_json(cfg))
    app = ClientApp()

    def delegate(msg: Message, ctx: Context) -> Message:
        return app_for_run_config(tuple(sorted(ctx.run_config.items())))(msg, ctx)

    app.train()(delegate)
    app.query()(delegate)
    return app


@lru_cache(maxsize=4)
def app_for_run_config(items: tuple[tuple[str, Any], ...]) -> ClientApp:
    return _bound_client_app(to_json(from_run_config(dict(items))))
