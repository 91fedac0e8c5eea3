"""Automatic rules: what receivers' responses make the server do by itself.

``[[shaping."<domain>".automation]]`` entries (and those of
``[shaping.default]``) watch every TransientFailure and Bounce of mail to
that domain: the response written as one line (``421 4.7.0 [TSS04] ...``)
is searched with the entry's ``regex``. When it matches (``threshold``
times within its period, or at the first match), the entry acts:

- ``suspend`` / ``bounce``: an ordinary rule for the destination domain of
  the response; ``*_tenant`` and ``*_campaign``: for that domain and the
  message's tenant or campaign (a message without one triggers nothing);
- ``max_message_rate=R``: the response's site is held to R for ``duration``
  (``DeliveryPort.throttle``).

A rule made here is like one an operator makes (stored, listed, cancellable,
pushed everywhere, audited) with the reason ``automation: <regex>`` and the
actor ``automation:<domain>#<n>``. While such a rule is in force, the same
trigger extends it (its end moves to now + duration) instead of adding a
second one. In a cluster, ``share`` publishes the rule (made or extended)
to the other nodes; with Redis away it stays on this node.

The matching runs in the call that records the outcome (a regex search per
entry); the action runs as a task of its own, so recording an outcome never
waits on a rule being pushed to the delivery process.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..audit import Actor
from ..config import Automation, Settings
from ..logs import Response
from ..message import QueueName
from .criteria import Criteria

if TYPE_CHECKING:
    from ..delivery.dispatch import DeliveryPort
    from .book import Rule
    from .bounce import Bounces
    from .kind import RuleKind
    from .suspend import Suspensions

log = logging.getLogger(__name__)

REASON_PREFIX = "automation: "


def one_line(resp: Response) -> str:
    """The response as the regexes see it: code, enhanced code, text."""
    return resp.text.replace("\r", " ").replace("\n", " ")


class Automations:
    """The automation engine of one server (see the module docstring)."""

    def __init__(self, settings: Settings, bounces: Bounces, suspensions: Suspensions,
                 delivery: Callable[[], DeliveryPort]) -> None:
        self.settings = settings
        self.bounces = bounces
        self.suspensions = suspensions
        self.delivery = delivery  # where mail is sent now (a site's rate is held there)
        self._regex: dict[str, re.Pattern[str]] = {}
        self._hits: dict[tuple, deque[float]] = {}
        self._busy: set[tuple] = set()
        self._tasks: set[asyncio.Task] = set()
        self.enabled = any(s.automation for s in settings.shaping.values())
        # In a cluster: publishes a rule made or extended here to the other nodes.
        self.share: Callable[[Rule], Awaitable[Any]] | None = None

    def observe(self, parts: QueueName, resp: Response, site: str) -> None:
        """A TransientFailure or Bounce of mail of queue ``parts`` from ``site``."""
        if not self.enabled:
            return
        entries = self.settings.automation_for(parts.domain)
        if not entries:
            return
        line = one_line(resp)
        now = time.time()
        for name, entry in entries:
            rx = self._regex.get(entry.regex)
            if rx is None:
                rx = self._regex[entry.regex] = re.compile(entry.regex)
            if rx.search(line) is None:
                continue
            scope = self._scope(entry, parts, site)
            if scope is None:
                log.warning("automation %s: %s needs a %s, and the message has none", name,
                            entry.action, entry.action.rpartition("_")[2])
                continue
            key = (name, scope)
            if entry.threshold is not None:
                hits = self._hits.setdefault(key, deque())
                hits.append(now)
                while hits and hits[0] < now - entry.threshold.period:
                    hits.popleft()
                if len(hits) < entry.threshold.count:
                    continue
                hits.clear()
            if key in self._busy:  # acting on it already
                continue
            self._busy.add(key)
            task = asyncio.create_task(self._act(name, entry, scope, key, site),
                                       name=f"automation {name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _scope(entry: Automation, parts: QueueName, site: str) -> tuple | None:
        """What the action applies to: the criteria (as a hashable tuple) or the site."""
        if entry.rate is not None:
            return ("site", site)
        what = entry.action.partition("_")[2]
        if what == "tenant":
            return None if parts.tenant is None else ("domain+tenant", parts.domain, parts.tenant)
        if what == "campaign":
            return (None if parts.campaign is None
                    else ("domain+campaign", parts.domain, parts.campaign))
        return ("domain", parts.domain)

    async def _act(self, name: str, entry: Automation, scope: tuple, key: tuple,
                   site: str) -> None:
        try:
            until = time.time() + entry.duration
            if entry.rate is not None:
                await self.delivery().throttle(site, entry.rate, until)
                log.warning("automation %s: site %s held to %s until %s", name, site,
                            entry.action.partition("=")[2], time.ctime(until))
                return
            kind: RuleKind = (self.bounces if entry.action.startswith("bounce")
                              else self.suspensions)
            criteria = _criteria(scope)
            actor = Actor(f"automation:{name}")
            request = {"automation": name, "regex": entry.regex, "action": entry.action,
                       "duration": entry.duration}
            mine = [r for r in kind.book.same_criteria(criteria)
                    if r.active() and r.reason.startswith(REASON_PREFIX)]
            if mine:
                rule = await kind.extend(mine[0].id, until, actor, request)
            else:
                rule = await kind.create(criteria, REASON_PREFIX + entry.regex, until,
                                         actor=actor, request=request)
            if rule is not None and self.share is not None:
                try:
                    await self.share(rule)
                except Exception as exc:
                    log.warning("automation %s: rule %s stays on this node: %s", name,
                                rule.id, exc)
        except Exception:
            log.exception("automation %s could not act", name)
        finally:
            self._busy.discard(key)

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)


def _criteria(scope: tuple) -> Criteria:
    if scope[0] == "domain+tenant":
        return Criteria.build(domain=scope[1], tenant=scope[2])
    if scope[0] == "domain+campaign":
        return Criteria.build(domain=scope[1], campaign=scope[2])
    return Criteria.build(domain=scope[1])
