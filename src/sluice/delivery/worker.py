"""The delivery process: the sites and their outbound SMTP connections.

``sluice serve`` with ``[server] workers`` above 0 runs delivery here, in a
process of its own, so the outbound SMTP work does not share a core with
the spool writer. The main process keeps everything that changes the spool:
it promotes due mail and sends it over in batches (``dispatch``); this
process routes each message, sends it, and reports its fate (``outcome``),
which the main process's queue manager records. Bodies are read from the
spool directly (read-only).

Rules: the main process pushes every active bounce and suspend rule
(``PushRules``) when one comes or goes, and its API answers only once this
process has them; the check right before DATA uses them. Waiting mail that a
new bounce rule selects is handed back when the main process asks
(``Withdraw``).

Shaping: the sites here hold the limits of ``[shaping]`` for the whole node
(delivery runs only here). A throttle (``Throttle``) lowers a site's
message rate for a while; the main process sends those still in force
again to a new delivery process before any message.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from ..config import Settings
from ..ipc import (
    Channel,
    Dispatch,
    Figures,
    Outcome,
    PushRules,
    Ready,
    Stop,
    Throttle,
    Withdraw,
    child_main,
)
from ..logs import Attempt, Response
from ..message import QueueName
from ..rules.book import BOUNCE, SUSPEND, RuleBook
from ..spool import Stored
from ..spool.sqlite import SpoolReader
from .dispatch import Dispatcher, Outcomes
from .mx import MxResolver
from .routes import Router


class Upstream(Outcomes):
    """``Outcomes`` for this process: rules as pushed, fates to the main process."""

    def __init__(self, settings: Settings, reader: SpoolReader) -> None:
        self.settings = settings
        self.bounces = RuleBook(BOUNCE)
        self.suspensions = RuleBook(SUSPEND)
        self.parts: dict[str, QueueName] = {}
        self.channel: Channel | None = None
        self._reader = reader

    def may_send_data(self, msg: Stored) -> bool:
        parts = self.parts[msg.queue]
        return (self.bounces.match(msg.queue, parts, msg) is None
                and self.suspensions.match(msg.queue, parts, msg) is None)

    async def dispose_stopped(self, msg: Stored) -> None:
        await self._tell(Outcome(kind="stopped", id=msg.id))

    async def delivered(self, msg: Stored, resp: Response, attempt: Attempt) -> None:
        await self._tell(Outcome(kind="delivered", id=msg.id, response=resp, attempt=attempt))

    async def bounced(self, msg: Stored, resp: Response, attempt: Attempt) -> None:
        await self._tell(Outcome(kind="bounced", id=msg.id, response=resp, attempt=attempt))

    async def attempt_failed(self, msg: Stored, resp: Response, attempt: Attempt,
                             count_attempt: bool = True) -> None:
        await self._tell(Outcome(kind="failed", id=msg.id, response=resp, attempt=attempt,
                                 count_attempt=count_attempt))

    async def load_body(self, body_id: int) -> bytes:
        return await self._reader.load_body(body_id)

    async def _tell(self, outcome: Outcome) -> None:
        assert self.channel is not None
        await self.channel.call(outcome)


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

    async def on_rules(msg: PushRules, payload: bytes) -> bool:
        bounces, suspensions = RuleBook(BOUNCE), RuleBook(SUSPEND)
        bounces.load(msg.bounces)
        suspensions.load(msg.suspensions)
        upstream.bounces, upstream.suspensions = bounces, suspensions
        return True

    async def on_dispatch(msg: Dispatch, payload: bytes) -> bool:
        upstream.parts.update(msg.queues)
        for m in msg.msgs:
            run(dispatcher.dispatch(m, upstream.parts[m.queue]))
        return True

    async def on_withdraw(msg: Withdraw, payload: bytes) -> list[str]:
        rule = upstream.bounces.get(msg.rule_id)
        return [m.id for m in dispatcher.take_matching(rule)] if rule is not None else []

    async def on_figures(msg: Figures, payload: bytes) -> dict[str, dict[str, Any]]:
        return await dispatcher.figures()

    async def on_throttle(msg: Throttle, payload: bytes) -> bool:
        await dispatcher.throttle(msg.site, msg.rate, msg.until)
        return True

    async def on_stop(msg: Stop, payload: bytes) -> list[str]:
        left = await dispatcher.stop(msg.grace)
        asyncio.get_running_loop().call_soon(stop.set)
        return [m.id for m in left]

    channel = upstream.channel = await Channel.over(sock, {
        PushRules: on_rules, Dispatch: on_dispatch, Withdraw: on_withdraw, Figures: on_figures,
        Throttle: on_throttle, Stop: on_stop})
    await channel.call(Ready(pid=os.getpid()))
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
