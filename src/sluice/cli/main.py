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
@click.option("--respond", "respond", multiple=True, metavar="'DOMAIN=CODE TEXT'",
              help="Answer DATA for mail to DOMAIN with this reply (repeatable), e.g. "
                   "'example.com=421 4.7.0 [TSS04] Messages deferred'.")
@click.option("--stats", type=click.Path(), default=None,
              help="Rewrite this file every second with the figures (JSON): accepted, "
                   "connections open and at most, messages per second.")
def sink(listen: str, record: str | None, respond: tuple[str, ...], stats: str | None) -> None:
    """A test SMTP sink: 250 for all but tempfail@ (451), permfail@ (550) and
    the domains given to --respond."""
    from .sink import parse_respond, run
    replies = {}
    for value in respond:
        try:
            domain, reply = parse_respond(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--respond") from None
        replies[domain] = reply
    sys.exit(run(listen, record, replies, stats))


@cli.command("dkim-keygen")
@click.option("--domain", required=True, help="The signing domain (d=), e.g. example.org.")
@click.option("--selector", required=True, help="The selector (s=), e.g. s2025.")
@click.option("--algorithm", type=click.Choice(["rsa-sha256", "ed25519-sha256"]),
              default="rsa-sha256", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="The private key file (PEM, mode 0600), never overwritten; "
                   "default SELECTOR.DOMAIN.key here.")
@click.option("--bits", type=int, default=2048, show_default=True,
              help="RSA key size (ed25519 keys have one size).")
def dkim_keygen(domain: str, selector: str, algorithm: str, out: str | None,
                bits: int) -> None:
    """Make a DKIM key: write the private key, print the DNS TXT record to publish."""
    from .dkim import run
    sys.exit(run(domain, selector, algorithm, out, bits))


@cli.command()
@click.argument("user")
@click.option("--tenant", default=None, help="Force this tenant onto the user's mail.")
@click.option("--scheme", type=click.Choice(["argon2", "bcrypt"]), default="argon2",
              show_default=True, help="The password hash.")
def passwd(user: str, tenant: str | None, scheme: str) -> None:
    """Print an auth_file line for USER; the password is read from standard
    input (asked twice on a terminal)."""
    from .passwd import run
    sys.exit(run(user, tenant, scheme))


for _name, _cmd in kcli.cli.commands.items():
    cli.add_command(_cmd, _name)


def main() -> None:
    cli(prog_name="sluice")
