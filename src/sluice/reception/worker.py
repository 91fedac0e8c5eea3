"""A reception worker: a process that only accepts SMTP and writes the spool.

``sluice serve`` with ``[server] workers = N`` runs N of these beside the
main process (queues, delivery, API, logs). Each listens on the SMTP ports
with SO_REUSEPORT, so the kernel spreads connections over them. They share
nothing with the main process but the spool and one IPC channel:
- main -> worker: the full rule set, whenever it changes (answered once in
  force, so an API call returns only when every worker enforces the rule),
  and ``stop``;
- worker -> main: the summary of each committed reception (answered once
  counted), before the client gets its 250.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import weakref
from typing import Any

from ..config import Settings, split_host_port
from ..ipc import Channel
from ..rules.store import RuleBook
from ..spool import SqliteSpool
from .intake import Intake
from .smtp import ReceptionHandler, start_smtp


async def _serve(settings: Settings, sock: socket.socket) -> None:
    spool = SqliteSpool(settings.data_path)
    await spool.open(main=False)
    rules = RuleBook()
    rules_ready = asyncio.Event()
    stop = asyncio.Event()

    async def handle(msg: dict[str, Any]) -> Any:
        if msg["type"] == "rules":
            rules.replace(msg["rules"])
            rules_ready.set()
            return True
        if msg["type"] == "stop":
            stop.set()
            return True
        return None

    channel = await Channel.over(sock, handle)

    async def report(summary: dict[str, Any]) -> None:
        await channel.call({"type": "received", "summary": summary})

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # The first message is the rule set: no mail is taken before it is in force.
    await rules_ready.wait()
    intake = Intake(settings, spool, rules, report)
    handler = ReceptionHandler(settings, intake)
    sessions: weakref.WeakSet = weakref.WeakSet()
    servers = []
    for listen in settings.smtp.listen:
        host, port = split_host_port(listen)
        servers.append(await start_smtp(settings, handler, host, port, sessions, reuse_port=True))
    await channel.call({"type": "ready", "pid": os.getpid()})
    stop_wait = asyncio.create_task(stop.wait())
    closed = asyncio.create_task(channel.wait_closed())
    await asyncio.wait({stop_wait, closed}, return_when=asyncio.FIRST_COMPLETED)
    for srv in servers:
        srv.close()
    await asyncio.sleep(0.2)  # a message being stored gets its 250
    for proto in list(sessions):
        if proto.transport is not None:
            proto.transport.close()
    await channel.close()
    await spool.close()


def main() -> None:
    """Entry point: ``python -m sluice.reception.worker FD`` with the settings
    as JSON on standard input."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
    fd = int(sys.argv[1])
    settings = Settings.model_validate_json(sys.stdin.read())
    sock = socket.socket(fileno=fd)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(settings, sock))


if __name__ == "__main__":
    main()
