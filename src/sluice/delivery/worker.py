"""The delivery process: the sites and their outbound SMTP connections.

``sluice serve`` with ``[server] workers`` above 0 runs delivery here, in a
process of its own, so the outbound SMTP work does not share a core with
the spool writer. The main process keeps everything that changes the spool:
it promotes due mail and sends it over in batches (``dispatch``); this
process routes each message, sends it, and reports its fate (``outcome``),
which the main process's queue manager records. Bodies are read from the
spool directly (read-only).

Rules: the main process pushes every active bounce and suspend rule
(``rules``) when one comes or goes, and its API answers only once this
process has them; the check right before DATA uses them. Waiting mail that a
new bounce rule catches is handed back at once.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from ..config import Settings
from ..ipc import Channel, child_main
from ..logs import NO_ATTEMPT, Attempt, Response
from ..message import QueueName
from ..queues.dispatch import Dispatcher, Outcomes
from ..rules.store import RuleBook
from ..spool import Stored
from ..spool.sqlite import SpoolReader
from .mx import MxResolver
from .routes import Router


def response_to_wire(resp: Response | None) -> list | None:
    if resp is None:
        return None
    return [resp.code, resp.content, resp.enhanced, resp.command]


def response_from_wire(data: list | None) -> Response | None:
    if data is None:
        return None
    code, content, enhanced, command = data
    return Response(code, content, tuple(enhanced) if enhanced else None, command)


class Upstream(Outcomes):
    """``Outcomes`` for this process: rules as pushed, fates to the main process."""

    def __init__(self, settings: Settings, reader: SpoolReader) -> None:
        self.settings = settings
        self.rules = RuleBook()
        self.parts: dict[str, QueueName] = {}
        self.channel: Channel | None = None
        self._reader = reader

    def may_send_data(self, msg: Stored) -> bool:
        return not self.rules.stops(msg.queue, self.parts[msg.queue])

    def bounced_now(self, msg: Stored) -> bool:
        return self.rules.bounce_for(msg.queue, self.parts[msg.queue]) is not None

    async def dispose_stopped(self, msg: Stored) -> None:
        await self._tell("stopped", msg)

    async def delivered(self, msg: Stored, resp: Response, attempt: Attempt) -> None:
        await self._tell("delivered", msg, resp, attempt)

    async def bounced(self, msg: Stored, resp: Response, attempt: Attempt) -> None:
        await self._tell("bounced", msg, resp, attempt)

    async def attempt_failed(self, msg: Stored, resp: Response, attempt: Attempt,
                             count_attempt: bool = True) -> None:
        await self._tell("failed", msg, resp, attempt, count_attempt)

    async def load_body(self, body_id: int) -> bytes:
        return await self._reader.load_body(body_id)

    async def _tell(self, kind: str, msg: Stored, resp: Response | None = None,
                    attempt: Attempt = NO_ATTEMPT, count_attempt: bool = True) -> None:
        assert self.channel is not None
        await self.channel.call({"type": "outcome", "kind": kind, "id": msg.id,
                                 "response": response_to_wire(resp),
                                 "attempt": attempt.to_wire(), "count_attempt": count_attempt})


async def _serve(settings: Settings, sock: socket.socket, listeners: list[socket.socket]) -> None:
    reader = SpoolReader(settings.data_path / "spool" / "spool.db")
    upstream = Upstream(settings, reader)
    dispatcher = Dispatcher(
        settings, Router(settings.routes, MxResolver(nameservers=settings.delivery.nameservers)),
        upstream)
    tasks: set[asyncio.Task] = set()
    stop = asyncio.Event()

    def run(coro: Any) -> None:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def handle(msg: dict[str, Any], payload: bytes) -> Any:
        kind = msg["type"]
        if kind == "rules":
            book = RuleBook()
            book.load(msg["rules"])
            upstream.rules = book
            for m in dispatcher.take(upstream.bounced_now):
                run(upstream.dispose_stopped(m))
            return True
        if kind == "dispatch":
            for name, parts in msg["queues"].items():
                upstream.parts[name] = QueueName(*parts)
            for row in msg["msgs"]:
                m = Stored(*row)
                run(dispatcher.dispatch(m, upstream.parts[m.queue]))
            return True
        if kind == "figures":
            return await dispatcher.figures()
        if kind == "stop":
            left = await dispatcher.stop(msg["grace"])
            asyncio.get_running_loop().call_soon(stop.set)
            return [m.id for m in left]
        return None

    channel = upstream.channel = await Channel.over(sock, handle)
    await channel.call({"type": "ready", "pid": os.getpid()})
    stop_wait = asyncio.create_task(stop.wait())
    closed = asyncio.create_task(channel.wait_closed())
    await asyncio.wait({stop_wait, closed}, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.sleep(0.05)  # the answer to "stop" goes out
    await channel.close()
    reader.close()


def main() -> None:
    """Entry point: ``python -m sluice.delivery.worker FD`` (see ``ipc.spawn``)."""
    child_main(_serve)


if __name__ == "__main__":
    main()
