"""``sluice``: serve, sink, and every ``kcli`` command."""

from __future__ import annotations

import sys

import click

from . import kcli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@kcli.options
@click.pass_context
def cli(ctx: click.Context, endpoint: str, token: str | None) -> None:
    """Sluice mail transfer agent."""
    kcli._setup(ctx, endpoint, token)


@cli.command()
@click.option("--config", "config_path", type=click.Path(), default=None,
              help="TOML config file; embedded defaults without it.")
def serve(config_path: str | None) -> None:
    """Run the MTA in the foreground (SIGTERM/SIGINT stop it gracefully)."""
    from .serve import run
    sys.exit(run(config_path))


@cli.command()
@click.option("--listen", default="127.0.0.1:2526", show_default=True, help="HOST:PORT")
@click.option("--record", type=click.Path(), default=None,
              help="Append one JSON line per accepted message to this file.")
def sink(listen: str, record: str | None) -> None:
    """A test SMTP sink: 250 for all but tempfail@ (451) and permfail@ (550)."""
    from .sink import run
    sys.exit(run(listen, record))


for _name, _cmd in kcli.cli.commands.items():
    cli.add_command(_cmd, _name)


def main() -> None:
    cli(prog_name="sluice")
