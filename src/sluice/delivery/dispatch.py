"""Dispatch: from a promoted message to a send, in whichever process delivers.

Two contracts meet here:

- ``DeliveryPort`` is what the queue side (promotion, the bounce rules) uses
  to hand mail over and take it back. ``Dispatcher`` implements it in the
  main process (``[server] workers = 0``); ``delivery.process.DeliveryProcess``
  implements it by talking to the delivery process.
- ``Outcomes`` is what a site asks before a send and tells after it: the
  queue manager when delivery runs in the main process, or
  ``delivery.worker.Upstream`` in the delivery process, which passes the
  fates on to the main process's queue manager.

``Dispatcher`` resolves each promoted message's next hop and puts it in
that site's ready queue; the sites send. A ready queue is per site and TLS
mode (``tls``): domains that share MX hosts share connections only when
their mail needs the same TLS, so mail whose domain requires TLS never
rides a connection that did without it. With ``[tls]`` empty (or naming
only the default mode) every message takes the default without a lookup.

Shaping: a site takes its limits (``Settings.limits_for``) from the domain
of the message that created it. As in KumoMTA, limits hold per site, so
domains that share MX hosts share the first one's limits (and a site's TLS
variants each hold them). Delivery runs in one process, so the limits hold
for the node whatever the number of reception processes. ``throttle``
lowers a site's message rate for a while (the automation engine's
``max_message_rate=`` action); the dispatcher remembers it for the sites
made while it lasts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..config import Settings
from ..logs import NO_ATTEMPT, Attempt, Response, internal_error
from ..message import QueueName
from ..spool import Stored
from .mx import DnsFailure
from .ready import Site
from .routes import Router
from .shaping import SiteThrottles
from .tls import TlsPolicy

if TYPE_CHECKING:
    from ..cluster.throttle import SharedRate
    from ..config import SiteLimits
    from ..rules.book import Rule

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

    async def dispose_stopped(self, msg: Stored) -> None:
        """A rule stopped ``msg`` before it was sent: bounce it or hold it."""

    async def delivered(self, msg: Stored, resp: Response, attempt: Attempt) -> None: ...

    async def bounced(self, msg: Stored, resp: Response, attempt: Attempt) -> None: ...

    async def attempt_failed(self, msg: Stored, resp: Response, attempt: Attempt,
                             count_attempt: bool = True) -> None: ...

    async def load_body(self, body_id: int) -> bytes: ...


class DeliveryPort(Protocol):
    """Where promoted mail goes, and where a bounce rule takes it back from."""

    async def dispatch(self, msg: Stored, parts: QueueName) -> None:
        """Hand over a promoted message (the rules were checked)."""

    async def withdraw(self, rule: Rule) -> list[Stored]:
        """Take the messages that ``rule`` selects out of the ready queues
        (not those whose send is under way: the check before DATA stops
        those); the caller gives them their fate."""

    async def rules_changed(self, bounces: Sequence[Rule], suspensions: Sequence[Rule]) -> None:
        """Put these rules in force where mail is sent, before returning."""

    async def throttle(self, site: str, rate: float, until: float) -> None:
        """Lower site ``site``'s max_message_rate to ``rate`` (per second) until
        the unix time ``until``: the lowest rate in force wins; after ``until``
        the configured limit holds again. ``site`` is what records call
        ``site`` (``NextHop.site``): every TLS variant of it is held, and so
        are those made while the throttle lasts."""

    async def figures(self) -> dict[str, dict[str, Any]]:
        """Per ready queue (site, with `` tls=<mode>`` for a mode other than
        the default): delivered, failed, connections, queued; the limits
        (max_connections, max_deliveries_per_connection, max_message_rate,
        max_connection_rate: per second, None when not set); the message rate
        in force (``message_rate_limit``, a throttle's while it lasts, until
        ``throttled_until``, a unix time, else None); and ``rate``, the
        messages delivered per second over the last 10 s."""

    async def stop(self, grace: float) -> list[Stored]:
        """Stop after sends under way end; returns what was not finished."""


class Dispatcher:
    """Next hops and ready queues (sites), in this process (a ``DeliveryPort``)."""

    def __init__(self, settings: Settings, router: Router, outcomes: Outcomes) -> None:
        self.settings = settings
        self.router = router
        self.outcomes = outcomes
        self.tls = TlsPolicy(settings.delivery, settings.tls)
        # Keyed by the site's name, with " tls=<mode>" appended when the mode
        # is not the default; the key names the site in ``figures``.
        self.sites: dict[str, Site] = {}
        self.parts: dict[str, QueueName] = {}  # of the queues of messages handed over
        self.throttles = SiteThrottles()
        self._redis: Any = None  # for shared rates ([cluster]), made when first needed

    async def dispatch(self, msg: Stored, parts: QueueName) -> None:
        """Route ``msg`` to its site's ready queue (the rules were checked)."""
        self.parts[msg.queue] = parts
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
        tls = self.tls
        if tls.per_domain:
            mode = tls.mode_for(parts.domain)
            key = hop.site if mode == tls.default else f"{hop.site} tls={mode}"
        else:
            mode, key = tls.default, hop.site
        site = self.sites.get(key)
        if site is None:
            limits = self.settings.limits_for(parts.domain)
            site = self.sites[key] = Site(hop, self.outcomes, limits, tls, mode,
                                          self._shared_rate(hop.site, limits))
            for _, rate, until in self.throttles.in_force(hop.site):
                site.throttle(rate, until)
        site.push(msg)

    def _shared_rate(self, site: str, limits: SiteLimits) -> SharedRate | None:
        """The cluster-wide schedule of ``site`` when its rate is shared."""
        url = self.settings.cluster.redis_url
        if not (limits.shared and limits.max_message_rate and url):
            return None
        from ..cluster.throttle import SharedRate  # redis is loaded only for shared rates
        if self._redis is None:
            import redis.asyncio as aioredis
            self._redis = aioredis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        return SharedRate(self._redis, site)

    async def throttle(self, site: str, rate: float, until: float) -> None:
        if not self.throttles.add(site, rate, until):
            return
        for s in list(self.sites.values()):
            if s.name == site:
                s.throttle(rate, until)

    def take_matching(self, rule: Rule) -> list[Stored]:
        """Remove the waiting (not in-flight) messages ``rule`` selects, from every site."""
        def selected(m: Stored) -> bool:
            parts = self.parts.get(m.queue)
            return (parts is not None and rule.criteria.matches(m.queue, parts)
                    and rule.criteria.matches_message(m))

        return [m for site in list(self.sites.values()) for m in site.take(selected)]

    async def withdraw(self, rule: Rule) -> list[Stored]:
        return self.take_matching(rule)

    async def rules_changed(self, bounces: Sequence[Rule], suspensions: Sequence[Rule]) -> None:
        """Nothing to do here: the sites ask the main process's rules."""

    async def figures(self) -> dict[str, dict[str, Any]]:
        """Per site: counts, limits and rates (see ``DeliveryPort.figures``)."""
        self.throttles.in_force()  # forget those that ended
        return {name: s.figures() for name, s in list(self.sites.items())}

    async def stop(self, grace: float) -> list[Stored]:
        """Stop the sites; returns the messages that were neither sent nor finished."""
        results = await asyncio.gather(*(s.stop(grace) for s in list(self.sites.values())))
        return [m for group in results for m in group]
