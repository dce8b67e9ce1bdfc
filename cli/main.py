"""The `fedstream` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedstream.protocol.config import Config, ConfigError, load, to_toml

app = typer.Typer(
    help="Federated online training on data streams, built on Flower.",
    no_args_is_help=True,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file (defaults fill the rest).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one key: section.key=value (repeatable)."),
]


def _load(config: Path | None, overrides: list[str] | None, extra: list[str]) -> Config:
    try:
        return load(config, [*(overrides or []), *extra])
    except ConfigError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def sim(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Results folder.")] = None,
    baselines: Annotated[
        bool, typer.Option("--baselines", help="Also run the local and centralized baselines.")
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", envvar="RAY_ADDRESS", help="Join this Ray cluster."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Simulate a federation of streaming clients (the embedded default without --config)."""
    extra = []
    if out is not None:
        extra.append(f"output.dir={_toml_str(str(out))}")
    if baselines:
        extra.append('simulation.baselines=["local", "centralized"]')
    if ray_address:
        extra.append(f"simulation.ray_address={_toml_str(ray_address)}")
    if quiet:
        extra.append("output.progress=false")
    cfg = _load(config, set_, extra)
    # heavy imports only once the config is good
    from fedstream.client.sources import DataError
    from fedstream.sim.runner import preflight, simulate

    try:
        preflight(cfg)
    except (DataError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    try:
        summary = simulate(cfg)
    except Exception as e:
        err.print(f"[red]error:[/red] {type(e).__name__}: {e}", highlight=False)
        raise typer.Exit(1) from None
    print_summary(summary, Path(cfg.output.dir))


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def print_summary(summary: dict[str, Any], out: Path) -> None:
    table = Table(title=f"fedstream: {summary['clients']} clients, {summary['rounds']} rounds")
    table.add_column("run")
    table.add_column("prequential accuracy", justify="right")
    table.add_column("samples", justify="right")
    table.add_row("federated", _pct(summary["prequential_accuracy"]), str(summary["samples_seen"]))
    for name, base in summary.get("baselines", {}).items():
        table.add_row(name, _pct(base["prequential_accuracy"]), str(base["samples_seen"]))
    Console().print(table)
    Console().print(
        f"{summary['client_updates']} client updates, {summary['client_failures']} failures, "
        f"{summary['wall_seconds']:.1f} s, {summary['bytes_up'] / 1e6:.1f} MB up, "
        f"{summary['bytes_down'] / 1e6:.1f} MB down. Results: {out}/"
    )
    if summary.get("secure_aggregation"):
        Console().print(
            f"Secure aggregation: the server saw only sums, "
            f"{summary['round_trips_per_round']:.2f} round trips a round "
            f"(Flower's SecAgg+ takes 4)."
        )


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the effective config, every default included."""
    typer.echo(to_toml(_load(config, set_, [])), nl=False)


def main() -> None:
    app(prog_name="fedstream")


if __name__ == "__main__":
    sys.exit(main())
