"""Ready queues: one per destination site, drained by up to N connections.

A site's ready queue holds the few messages promoted for it (in memory, in
order). Each connection task takes the next message, asks its ``Outcomes``
whether it may still go (rules can change at any moment), and sends it over
a connection it keeps open for the following messages. Whatever goes wrong
while a message is in flight, it leaves with an outcome: delivered, bounced,
stopped by a rule, or failed (a TransientFailure and a retry), an unexpected
exception included.

A site's connections all use one TLS mode (``tls``): the dispatcher keeps a
site per next hop and mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..logs import internal_error
from ..spool import Stored
from .routes import NextHop
from .smtp import Connection, DeliveryError, Stopped

if TYPE_CHECKING:
    from ..config import TlsMode
    from .dispatch import Outcomes
    from .tls import TlsPolicy

log = logging.getLogger(__name__)


class Site:
    IDLE_SECONDS = 5.0

    def __init__(self, hop: NextHop, outcomes: Outcomes, max_connections: int,
                 per_connection: int, tls: TlsPolicy, tls_mode: TlsMode) -> None:
        self.name = hop.site
        self.hop = hop
        self.tls = tls
        self.tls_mode = tls_mode
        self.outcomes = outcomes
        self.queue: deque[Stored] = deque()
        self.max_connections = max_connections
        self.per_connection = per_connection
        self.connections = 0
        self.idle = 0
        self.delivered = 0
        self.failed = 0
        self.in_flight: dict[str, Stored] = {}
        self._ready = asyncio.Condition()
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    def push(self, msg: Stored) -> None:
        self.queue.append(msg)
        # One more connection while the queue outgrows the ones there are.
        if (self.idle == 0 and self.connections < self.max_connections and not self._stopping
                and len(self.queue) > 2 * self.connections):
            self.connections += 1
            task = asyncio.create_task(self._run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif self.idle:
            asyncio.create_task(self._notify())

    async def _notify(self) -> None:
        async with self._ready:
            self._ready.notify()

    def take(self, pred: Callable[[Stored], bool]) -> list[Stored]:
        """Remove and return the queued (not in-flight) messages ``pred`` selects."""
        taken = [m for m in self.queue if pred(m)]
        if taken:
            ids = {m.id for m in taken}
            self.queue = deque(m for m in self.queue if m.id not in ids)
        return taken

    async def _next(self) -> Stored | None:
        if self.queue:
            return self.queue.popleft()
        async with self._ready:
            self.idle += 1
            try:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._ready.wait_for(lambda: bool(self.queue) or self._stopping),
                                           self.IDLE_SECONDS)
            finally:
                self.idle -= 1
        if self.queue and not self._stopping:
            return self.queue.popleft()
        return None

    async def _run(self) -> None:
        m = self.outcomes
        conn = self._connection()
        try:
            while not self._stopping:
                msg = await self._next()
                if msg is None:
                    break
                self.in_flight[msg.id] = msg
                try:
                    conn = await self._handle(conn, msg)
                except Exception as exc:
                    # Whatever went wrong, the message gets a record and a retry.
                    log.exception("delivering %s to %s failed", msg.id, self.name)
                    await conn.close()
                    if self.in_flight.pop(msg.id, None) is not None:
                        self.failed += 1
                        try:
                            await m.attempt_failed(msg, internal_error(exc, "delivery"),
                                                   conn.attempt(self.name))
                        except Exception:  # the queue side reclaims it (orphan)
                            log.exception("recording the failure of %s failed", msg.id)
        finally:
            self.connections -= 1
            await conn.close()
            if self.queue and not self._stopping and self.connections == 0:
                # Messages pushed while this task was winding down still need a sender.
                self.connections += 1
                task = asyncio.create_task(self._run())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _connection(self) -> Connection:
        d = self.outcomes.settings.delivery
        return Connection(self.outcomes.settings.smtp.hostname, d.connect_timeout,
                          d.command_timeout, self.tls, self.tls_mode)

    async def _handle(self, conn: Connection, msg: Stored) -> Connection:
        """Send ``msg`` (in flight) over ``conn`` or a new connection; returns the
        connection to use next."""
        m = self.outcomes
        if not await m.may_dispatch(msg):
            self.in_flight.pop(msg.id, None)
            return conn
        if not conn.is_open or conn.sent >= self.per_connection:
            await conn.close()
            conn = self._connection()
            try:
                await conn.open(self.hop.hosts)
            except DeliveryError as exc:
                # The site is unreachable (or not with the TLS its mail
                # needs): everything waiting for it fails now.
                self.in_flight.pop(msg.id, None)
                failing = [msg, *self.take(lambda _: True)]
                self.failed += len(failing)
                attempt = conn.attempt(self.name)
                for f in failing:
                    await m.attempt_failed(f, exc.response, attempt)
                return conn
        await self._send(conn, msg)
        return conn

    async def _send(self, conn: Connection, msg: Stored) -> None:
        m = self.outcomes
        body = await m.load_body(msg.body_id)
        try:
            resp = await conn.send(msg.sender, msg.recipient, body,
                                   lambda: m.may_send_data(msg))
        except Stopped:
            self.in_flight.pop(msg.id, None)
            await m.dispose_stopped(msg)
            return
        except DeliveryError as exc:
            self.in_flight.pop(msg.id, None)
            self.failed += 1
            attempt = conn.attempt(self.name)
            if not exc.connection_ok:
                await conn.close()
            if exc.permanent:
                await m.bounced(msg, exc.response, attempt)
            else:
                await m.attempt_failed(msg, exc.response, attempt)
            return
        self.in_flight.pop(msg.id, None)
        self.delivered += 1
        await m.delivered(msg, resp, conn.attempt(self.name))

    async def stop(self, grace: float) -> list[Stored]:
        """Stop taking messages; wait up to ``grace`` s for sends under way.

        Returns the messages that were neither sent nor finished.
        """
        self._stopping = True
        async with self._ready:
            self._ready.notify_all()
        left = list(self.queue)
        self.queue.clear()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        left.extend(self.in_flight.values())
        self.in_flight.clear()
        return left
