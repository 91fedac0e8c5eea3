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

Shaping (``[shaping]``, ``SiteLimits``): a site keeps at most
``max_connections`` connections, each for at most
``max_deliveries_per_connection`` messages and closed after
``idle_timeout`` without one; ``max_message_rate`` spaces the sends of the
whole site (every connection) and ``max_connection_rate`` the opening of
connections (``shaping.RateLimiter``). Without a rate, no limiter is
awaited. ``throttle`` lowers the message rate for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..logs import internal_error
from ..spool import Stored
from .routes import NextHop
from .shaping import RateLimiter, RateMeter
from .smtp import Connection, DeliveryError, Stopped

if TYPE_CHECKING:
    from ..cluster.throttle import SharedRate
    from ..config import SiteLimits, TlsMode
    from .dispatch import Outcomes
    from .tls import TlsPolicy

log = logging.getLogger(__name__)


class Site:
    def __init__(self, hop: NextHop, outcomes: Outcomes, limits: SiteLimits,
                 tls: TlsPolicy, tls_mode: TlsMode, shared_rate: SharedRate | None = None) -> None:
        self.name = hop.site
        self.hop = hop
        self.tls = tls
        self.tls_mode = tls_mode
        self.outcomes = outcomes
        self.queue: deque[Stored] = deque()
        self.limits = limits
        self.max_connections = limits.max_connections
        self.per_connection = limits.max_deliveries_per_connection
        self.message_rate = RateLimiter(limits.max_message_rate, shared=shared_rate)
        self.connection_rate = RateLimiter(limits.max_connection_rate)
        self.meter = RateMeter()
        self.connections = 0
        self.idle = 0
        self.delivered = 0
        self.failed = 0
        self.in_flight: dict[str, Stored] = {}
        self._ready = asyncio.Condition()
        self._tasks: set[asyncio.Task] = set()
        self._waiting_slot: set[asyncio.Task] = set()  # connection tasks waiting for a slot
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
                                           self.limits.idle_timeout)
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
        s = self.outcomes.settings
        return Connection(s.smtp.hostname, self.limits.connect_timeout,
                          s.delivery.command_timeout, self.tls, self.tls_mode)

    async def _slot(self, limiter: RateLimiter) -> None:
        """Wait for ``limiter``'s next slot (``stop`` cancels the wait)."""
        task = asyncio.current_task()
        assert task is not None
        self._waiting_slot.add(task)
        try:
            await limiter.acquire()
        finally:
            self._waiting_slot.discard(task)

    def throttle(self, rate: float, until: float) -> None:
        """Hold the message rate to at most ``rate`` per second until the unix
        time ``until`` (the configured rate holds again after)."""
        self.message_rate.throttle(rate, time.monotonic() + (until - time.time()))

    def figures(self) -> dict[str, int | float | None]:
        """Counts, limits, the message rate in force and the rate delivered."""
        lim = self.limits
        throttled = self.message_rate.throttled()
        return {
            "delivered": self.delivered, "failed": self.failed,
            "connections": self.connections, "queued": len(self.queue) + len(self.in_flight),
            "max_connections": lim.max_connections,
            "max_deliveries_per_connection": lim.max_deliveries_per_connection,
            "max_message_rate": lim.max_message_rate,
            "max_connection_rate": lim.max_connection_rate,
            # the limit in force: a throttle's while it lasts
            "message_rate_limit": self.message_rate.rate(),
            "throttled_until": (round(time.time() + (throttled[1] - time.monotonic()), 3)
                                if throttled else None),
            # delivered per second over the last 10 s
            "rate": self.meter.rate(),
        }

    async def _handle(self, conn: Connection, msg: Stored) -> Connection:
        """Send ``msg`` (in flight) over ``conn`` or a new connection; returns the
        connection to use next."""
        m = self.outcomes
        if not await m.may_dispatch(msg):
            self.in_flight.pop(msg.id, None)
            return conn
        limiter = self.message_rate
        early = False
        if limiter.limited and limiter.expected_wait() > self.limits.idle_timeout:
            # A long wait (a low rate, or a throttle): not on an idle connection.
            await conn.close()
            await self._slot(limiter)
            early = True
        if not conn.is_open or conn.sent >= self.per_connection:
            await conn.close()
            conn = self._connection()
            if self.connection_rate.limited:
                await self._slot(self.connection_rate)
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
        if limiter.limited and not early:
            try:
                await self._slot(limiter)
            except asyncio.CancelledError:  # stopping: this connection is ours to close
                await conn.close()
                raise
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
        self.meter.add()
        await m.delivered(msg, resp, conn.attempt(self.name))

    async def stop(self, grace: float) -> list[Stored]:
        """Stop taking messages; wait up to ``grace`` s for sends under way.

        Returns the messages that were neither sent nor finished.
        """
        self._stopping = True
        for task in list(self._waiting_slot):  # nothing was sent for these yet
            task.cancel()
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
