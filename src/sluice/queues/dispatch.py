"""Dispatch: from a promoted message to a send, in whichever process delivers.

``Dispatcher`` resolves each promoted message's next hop and puts it in that
site's ready queue; the sites send. Every fate goes back through an
``Outcomes`` object: the queue manager itself when delivery runs in the
main process, or ``delivery.worker.Upstream`` in the delivery process, which
passes the fates to the main process's queue manager.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from ..config import Settings
from ..delivery.mx import DnsFailure
from ..delivery.routes import Router
from ..logs import NO_ATTEMPT, Attempt, Response, internal_error
from ..message import QueueName
from ..spool import Stored
from .ready import Site

log = logging.getLogger(__name__)


class Outcomes(Protocol):
    """What a site asks before a send and tells after it."""

    settings: Settings

    def may_send_data(self, msg: Stored) -> bool:
        """No bounce or suspend rule stops ``msg`` now (checked right before DATA)."""

    async def may_dispatch(self, msg: Stored) -> bool:
        """Like ``may_send_data``; a stopped message is disposed of."""
        if self.may_send_data(msg):
            return True
        await self.dispose_stopped(msg)
        return False

    async def dispose_stopped(self, msg: Stored) -> None: ...

    async def delivered(self, msg: Stored, resp: Response, attempt: Attempt) -> None: ...

    async def bounced(self, msg: Stored, resp: Response, attempt: Attempt) -> None: ...

    async def attempt_failed(self, msg: Stored, resp: Response, attempt: Attempt,
                             count_attempt: bool = True) -> None: ...

    async def load_body(self, body_id: int) -> bytes: ...


class Delivery(Protocol):
    """Where the queue manager hands promoted mail: a ``Dispatcher`` here, or
    ``delivery.process.DeliveryProcess`` for the delivery process."""

    async def dispatch(self, msg: Stored, parts: QueueName) -> None: ...

    def take(self, pred: Callable[[Stored], bool]) -> list[Stored]: ...

    async def rules_changed(self) -> None: ...

    async def figures(self) -> dict[str, dict[str, int]]: ...

    async def stop(self, grace: float) -> list[Stored]: ...


class Dispatcher:
    """Next hops and ready queues (sites), in this process."""

    def __init__(self, settings: Settings, router: Router, outcomes: Outcomes) -> None:
        self.settings = settings
        self.router = router
        self.outcomes = outcomes
        self.sites: dict[str, Site] = {}

    async def dispatch(self, msg: Stored, parts: QueueName) -> None:
        """Route ``msg`` to its site's ready queue (the rules were checked)."""
        try:
            hop = await self.router.next_hop(parts.domain, parts.routing_domain)
        except DnsFailure as exc:
            if exc.permanent:
                await self.outcomes.bounced(msg, exc.response, NO_ATTEMPT)
            else:
                await self.outcomes.attempt_failed(msg, exc.response, NO_ATTEMPT,
                                                   count_attempt=False)
            return
        except Exception as exc:
            log.exception("routing %s failed", msg.id)
            await self.outcomes.attempt_failed(msg, internal_error(exc, "routing"), NO_ATTEMPT,
                                               count_attempt=False)
            return
        site = self.sites.get(hop.site)
        if site is None:
            d = self.settings.delivery
            site = self.sites[hop.site] = Site(hop, self.outcomes, d.connections_per_site,
                                               d.messages_per_connection)
        site.push(msg)

    def take(self, pred: Callable[[Stored], bool]) -> list[Stored]:
        """Remove the waiting (not in-flight) messages ``pred`` selects, from every site."""
        return [m for site in list(self.sites.values()) for m in site.take(pred)]

    async def rules_changed(self) -> None:
        """Nothing to do here: the sites ask the same rule book."""

    async def figures(self) -> dict[str, dict[str, int]]:
        """Per site: delivered, failed, open connections, messages waiting or in flight."""
        return {name: {"delivered": s.delivered, "failed": s.failed,
                       "connections": s.connections,
                       "queued": len(s.queue) + len(s.in_flight)}
                for name, s in list(self.sites.items())}

    async def stop(self, grace: float) -> list[Stored]:
        """Stop the sites; returns the messages that were neither sent nor finished."""
        results = await asyncio.gather(*(s.stop(grace) for s in list(self.sites.values())))
        return [m for group in results for m in group]
