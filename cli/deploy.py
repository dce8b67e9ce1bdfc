"""`fedstream certs`, `fedstream server` and `fedstream client`: a real deployment."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from fedstream.cli.main import (
    ConfigOpt,
    SetOpt,
    _load,
    _toml_str,
    address_problem,
    app,
    err,
    fail,
    report,
)


@app.command()
def certs(
    out: Annotated[Path, typer.Argument(help="Directory for the CA, server cert and keys.")],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="Name or address clients dial (repeatable); "
                     "localhost, 127.0.0.1 and ::1 by default. 127.0.0.1 is always "
                     "included: the SuperLink's own processes dial it."),
    ] = None,
    node: Annotated[
        list[str] | None, typer.Option("--node", help="Make a SuperNode key pair NAME.key/.pub.")
    ] = None,
) -> None:
    """Make a CA, a server certificate and SuperNode key pairs.

    Existing ones are kept; --host for other names issues the server certificate again,
    from the same CA."""
    from fedstream.server.credentials import SERVER_CERT, make_credentials, server_hosts

    before = server_hosts(out) if (out / SERVER_CERT).exists() else None
    try:
        make_credentials(out, host or None, node or [])
    except FileNotFoundError as e:
        fail(e, 2)
    after = server_hosts(out)
    if before is not None and sorted(before) != sorted(after):
        typer.echo(f"server certificate issued again for {', '.join(after)} (was "
                   f"{', '.join(before)}); same CA, so devices keep their ca.crt")
    typer.echo(f"credentials in {out}/: ca.crt (give to clients), server.pem, server.key"
               + "".join(f", {n}.key (give to that device), {n}.pub" for n in node or []))


@app.command()
def server(
    state: Annotated[Path, typer.Option("--state", help="State directory (checkpoints, logs).")],
    credentials: Annotated[
        Path, typer.Option("--credentials", help="Directory made by `fedstream certs`.")
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    node_key: Annotated[
        list[Path] | None,
        typer.Option("--node-key", help="SuperNode public key to register (repeatable); "
                     "default: every *.pub in the credentials directory."),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=1, max=65535, help="Port of the SuperLink.")
    ] = 9092,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint in --state.")
    ] = False,
) -> None:
    """Run the aggregator: a TLS, authenticating SuperLink and the fedstream ServerApp."""
    out = state / "results"
    cfg = _load(config, set_, [f"output.dir={_toml_str(str(out.resolve()))}",
                               "output.progress=false"])
    keys = node_key if node_key is not None else sorted(credentials.glob("*.pub"))
    from fedstream.protocol.runtime import Stopped, on_signals
    from fedstream.server.aggregator import Aggregator, serve
    from fedstream.server.checkpoint import CHECKPOINT

    try:
        held = (state / CHECKPOINT).exists()
    except PermissionError:  # a folder on the way cannot be entered
        fail(f"--state {state}: permission denied on the way to it", 2)
    if not resume and held:
        fail(f"--state {state} holds a run already ({state / CHECKPOINT}): --resume continues "
             "it; to start a new run, give another --state (starting over here would replace "
             "its checkpoint and results)", 2)
    try:
        # Ctrl-C or SIGTERM: serve() stops the SuperLink and its apps
        with on_signals("stopping the SuperLink and its apps (a few seconds) ..."):
            status = serve(Aggregator(state.resolve(), credentials, host, port), cfg, keys,
                           resume)
    except Stopped as e:
        again = " (fedstream server --resume continues the run)" if (
            state / CHECKPOINT).exists() else ""
        err.print(f"stopped ({e}): the SuperLink and its apps are stopped{again}",
                  markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except PermissionError as e:
        fail(f"--state {state}: cannot write there ({e.strerror}: {e.filename})", 2)
    except (FileNotFoundError, TimeoutError, RuntimeError, ValueError) as e:
        fail(e, 2 if isinstance(e, FileNotFoundError | ValueError) else 1)
    typer.echo(f"run {status}; results in {out}/, logs in {state / 'logs'}/")
    if status != "completed":
        raise typer.Exit(1)
    if (out / "summary.json").exists():
        report(json.loads((out / "summary.json").read_text()), out)


@app.command()
def client(
    server_address: Annotated[str, typer.Option("--server", help="SuperLink host:port.")],
    state: Annotated[Path, typer.Option("--state", help="Device state directory (the spool).")],
    client_id: Annotated[int, typer.Option("--client-id", min=0, help="This device's client id.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    ca: Annotated[Path | None, typer.Option("--ca", help="CA certificate to trust.")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="SuperNode private key.")] = None,
    ingest: Annotated[
        str, typer.Option("--ingest", help="unix:///path.sock or 127.0.0.1:PORT "
                          "(default: unix socket in --state).")
    ] = "",
    capacity: Annotated[int, typer.Option("--capacity", min=1, help="Spool capacity.")] = 1_000_000,
    policy: Annotated[
        str, typer.Option("--policy", help="When full: reject (back-pressure) or drop_oldest.")
    ] = "reject",
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS (only for a SuperLink without it).")
    ] = False,
    max_wait: Annotated[
        float, typer.Option("--max-wait", help="Give up connecting after this many seconds.")
    ] = 0.0,
    cold: Annotated[
        bool, typer.Option("--cold", help="Flower's default SuperExec: a new flwr-clientapp "
                           "process (with all its imports) per message, instead of forking "
                           "each from a warm, preloaded one.")
    ] = False,
) -> None:
    """Run a device: spool, local ingestion service and a SuperNode connected to the server."""
    cfg = _load(config, set_, [])
    if client_id >= (n := cfg.federation.clients):
        fail(f"--client-id {client_id} is not a client of this federation: "
             f"federation.clients = {n}{f' in {config}' if config else ''} (ids 0 to {n - 1})",
             2)
    if policy not in ("reject", "drop_oldest"):
        fail(f"--policy must be reject or drop_oldest, got {policy!r}", 2)
    for problem in (address_problem(server_address, "--server"),
                    ingest and address_problem(ingest, "--ingest", unix=True)):
        if problem:
            fail(problem, 2)
    if insecure and (ca is not None or key is not None):
        fail("--insecure means no TLS and no authentication: it cannot be used with --ca "
             "or --key (a SuperLink that checks them wants them)", 2)
    for name, path in (("--ca", ca), ("--key", key)):
        if path is not None and not path.is_file():
            fail(f"{name}: file not found: {path}", 2)
    if ca is not None:
        from fedstream.server.credentials import check_certificate

        try:
            check_certificate(ca)
        except ValueError as e:
            fail(f"--ca {e}", 2)
    if key is not None and (problem := _not_a_node_key(key)):
        fail(f"--key {key}: {problem}; use a NAME.key made by `fedstream certs DIR --node NAME`",
             2)
    # The ingestion service's gRPC threads are busy whenever a SuperNode is started (a fork),
    # and gRPC's fork handlers then log "skipping fork() handlers" on this terminal. Nothing
    # here needs them: every child execs at once (the warm SuperExec's tasks fork from its
    # zygote, which has no gRPC running). Read when gRPC loads, so before the import below.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    from fedstream.client.ingest import IngestError
    from fedstream.client.node import Device, run_device
    from fedstream.client.privacy import bounds, requirement
    from fedstream.client.spool import SpoolError
    from fedstream.server.app import planned_noise  # the z its own config calibrates to

    dev = Device(
        server=server_address, state=state.resolve(), client_id=client_id,
        n_features=cfg.stream.n_features, n_classes=cfg.stream.n_classes, ca=ca, key=key,
        ingest=ingest, capacity=capacity,
        policy=policy, insecure=insecure, max_wait=max_wait, cold=cold,  # type: ignore[arg-type]
        secure_only=cfg.secure_aggregation.enabled,
        private_only=requirement(cfg.privacy, cfg.secure_aggregation.enabled),
        private_bounds=bounds(
            cfg.privacy, planned_noise(cfg) if cfg.privacy.enabled else 0.0,
            cfg.federation.clients,
        ),
    )
    try:
        code = run_device(dev)
    except (SpoolError, IngestError) as e:  # e.g. another device on this --state or port
        fail(e, 2)
    raise typer.Exit(code)


def _not_a_node_key(path: Path) -> str:
    """Why `path` is not a key Flower's SuperNode can load ('' if it is): an unencrypted
    OpenSSH elliptic-curve private key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        private = load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        return f"not an OpenSSH private key ({e})"
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        kind = type(private).__name__.removeprefix("_").removesuffix("PrivateKey")
        return f"an OpenSSH {kind} key, not an elliptic-curve (EC) one"
    return ""
