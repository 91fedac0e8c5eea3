"""``sluice serve``: run the MTA in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import sys

from ..config import ConfigError, Settings, load_settings
from ..server import Server, StartupError

log = logging.getLogger("sluice")


async def _main(settings: Settings) -> None:
    server = Server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"sluice: SMTP on {', '.join(server.settings.smtp.listen)}, "
          f"HTTP on {', '.join(server.settings.http.listen)}, "
          f"data in {server.settings.data_path}", file=sys.stderr, flush=True)
    await stop.wait()
    print("sluice: stopping", file=sys.stderr, flush=True)
    await server.stop()


def _raise_fd_limit() -> None:
    """An MTA holds many connections: use the hard limit on open files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(config_path: str | None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        print(f"sluice: bad configuration: {exc}", file=sys.stderr)
        return 2
    source = config_path or "embedded defaults"
    for warning in settings.smtp.hostname_warnings():
        log.warning("%s: %s", source, warning)
    _raise_fd_limit()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(_main(settings))
    except ConfigError as exc:  # a value that validated but cannot be used (a key, a file)
        print(f"sluice: bad configuration: {source}: {exc}", file=sys.stderr)
        return 2
    except (StartupError, OSError) as exc:
        print(f"sluice: cannot start: {source}: {exc}", file=sys.stderr)
        return 1
    return 0
