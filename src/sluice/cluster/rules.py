"""Bounce and suspend rules held by the whole cluster, through Redis.

With ``[cluster] redis_url``, a rule created, cancelled, applied (a bounce's
grace ended) or restored on any node is in force (or ended, applied,
restored: each node puts back what it retained) on every live node before
the API answers:

1. the node checks that Redis answers (else the API says 503 and nothing
   is done);
2. it makes the change locally, as without a cluster;
3. it writes the rule to the hash ``sluice:rules`` (or removes it there, on
   a cancel) and publishes the change on ``sluice:rules:changes``; a write
   that fails there undoes the local change (503, nothing half-done);
4. every other node, subscribed to that channel, makes the same change in
   its own spool and rules (the same rule id, audited with the actor
   ``cluster:<origin node>``) and confirms in ``sluice:acks:<change>``;
5. the origin waits for the confirmations of the live nodes (at most
   ``CONFIRM_SECONDS``) and answers ``"nodes": {"<node>": "confirmed" |
   "unreachable"}``.

A node that starts, or that finds Redis again after losing it, first takes
every rule of ``sluice:rules`` it does not hold, and ends the rules it holds
that the cluster ended meanwhile (the sorted set ``sluice:rules:ended``, by
time, kept for ``ENDED_KEPT`` seconds): ``catch_up``, at start before its
listeners open. Rules an automation makes or extends are published like an
operator's (``rules.automation``).

Redis may lose what it held (a restart without persistence, a failover
before replication). The key ``sluice:rules:epoch``, set once the rules
are there, tells: when ``catch_up`` finds it missing, the node publishes
again every rule in force it holds that Redis lacks, so that a node that
starts later still learns them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError

from ..audit import Actor
from .link import ClusterLink, ClusterUnavailable

if TYPE_CHECKING:
    from ..rules.book import Rule
    from ..rules.kind import RuleKind

log = logging.getLogger(__name__)

RULES = "sluice:rules"
ENDED = "sluice:rules:ended"
CHANGES = "sluice:rules:changes"
EPOCH = "sluice:rules:epoch"
CONFIRM_SECONDS = 2.0
ENDED_KEPT = 7 * 86400


def _acks(change: str) -> str:
    return f"sluice:acks:{change}"


class ClusterRules:
    def __init__(self, link: ClusterLink, kinds: dict[str, RuleKind]) -> None:
        self.link = link
        self.redis = link.redis
        self.kinds = kinds  # by kind name: "bounce", "suspend"
        self._task: asyncio.Task | None = None
        self._caught_up = False  # the cluster's rules were read since the start

    # -- this node's changes ------------------------------------------------

    async def check(self) -> None:
        """ClusterUnavailable unless Redis answers (before any change)."""
        try:
            await self.redis.ping()
        except RedisError as exc:
            raise ClusterUnavailable(f"Redis at {self.link.url} cannot be reached: {exc}") \
                from None

    async def created(self, rule: Rule) -> dict[str, str]:
        """Publish a rule made here; the live nodes' confirmations."""
        return await self._publish("create", rule.kind, rule.id, rule.to_row())

    async def cancelled(self, kind: str, rule_id: str) -> dict[str, str]:
        return await self._publish("cancel", kind, rule_id, None)

    async def applied(self, rule_id: str) -> dict[str, str]:
        return await self._publish("apply", "bounce", rule_id, None)

    async def restored(self, rule_id: str) -> dict[str, str]:
        return await self._publish("restore", "bounce", rule_id, None)

    async def _publish(self, op: str, kind: str, rule_id: str,
                       row: dict[str, Any] | None) -> dict[str, str]:
        change = uuid.uuid4().hex
        message = orjson.dumps({"op": op, "kind": kind, "id": rule_id,
                                "origin": self.link.name, "change": change})
        try:
            others = [n["name"] for n in await self.link.nodes() if n["name"] != self.link.name]
            async with self.redis.pipeline(transaction=True) as p:
                if row is not None:
                    p.hset(RULES, rule_id, orjson.dumps(row))
                elif op in ("cancel", "restore"):  # a restore ends the rule first
                    now = time.time()
                    p.hdel(RULES, rule_id)
                    p.zadd(ENDED, {rule_id: now})
                    p.zremrangebyscore(ENDED, 0, now - ENDED_KEPT)
                p.publish(CHANGES, message)
                await p.execute()
        except (RedisError, ClusterUnavailable) as exc:
            raise ClusterUnavailable(f"Redis at {self.link.url} cannot be reached: {exc}") \
                from None
        nodes = {self.link.name: "confirmed"}
        deadline = time.monotonic() + CONFIRM_SECONDS
        confirmed: set[str] = set()
        while others and time.monotonic() < deadline:
            try:
                confirmed = {k.decode() for k in await self.redis.hkeys(_acks(change))}
            except RedisError:
                break
            if confirmed >= set(others):
                break
            await asyncio.sleep(0.005)
        for name in others:
            nodes[name] = "confirmed" if name in confirmed else "unreachable"
        return nodes

    # -- the other nodes' changes ---------------------------------------------

    async def catch_up(self) -> int:
        """Take every rule of the cluster this node does not hold, and end
        those the cluster ended; returns how many changed here."""
        actor = Actor("cluster:catch-up")
        lost = not await self.redis.exists(EPOCH)
        rows = await self.redis.hgetall(RULES)
        ended = {i.decode() for i in await self.redis.zrange(ENDED, 0, -1)}
        changed = 0
        for raw in rows.values():
            row = orjson.loads(raw)
            kind = self.kinds.get(row.get("kind"))
            if kind is not None and await kind.adopt(row, actor):
                changed += 1
        for kind in self.kinds.values():
            for rule in kind.active():
                if rule.id in ended and await kind.cancel(rule.id, actor) is not None:
                    changed += 1
        if lost:
            await self._refill({k.decode() for k in rows}, ended)
        return changed

    async def _refill(self, known: set[str], ended: set[str]) -> None:
        """Redis lost the rules (or never had them): publish again the rules
        in force here that it lacks, then mark it as holding them."""
        mine = [r for kind in self.kinds.values() for r in kind.active()
                if r.id not in known and r.id not in ended]
        async with self.redis.pipeline(transaction=True) as p:
            for rule in mine:
                p.hset(RULES, rule.id, orjson.dumps(rule.to_row()))
                p.publish(CHANGES, orjson.dumps({
                    "op": "create", "kind": rule.kind, "id": rule.id, "origin": self.link.name,
                    "change": uuid.uuid4().hex}))
            p.set(EPOCH, str(time.time()))
            await p.execute()
        if mine:
            log.warning("cluster: Redis lacked %d rule(s) in force here; published them again",
                        len(mine))

    async def start(self) -> None:
        """Catch up (when Redis answers), then follow the changes."""
        try:
            taken = await self.catch_up()
            self._caught_up = True
            if taken:
                log.warning("cluster: %d rule(s) taken from the cluster at start", taken)
        except RedisError as exc:
            log.warning("cluster: cannot read the cluster's rules (%s); following them once "
                        "Redis answers", exc)
        self._task = asyncio.create_task(self._follow(), name="cluster-rules")

    async def _follow(self) -> None:
        first = True
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANGES)
                if not (first and self._caught_up):
                    await self.catch_up()  # what changed while Redis was away
                    self._caught_up = True
                first = False
                async for message in pubsub.listen():
                    await self._apply(orjson.loads(message["data"]))
            except asyncio.CancelledError:
                await pubsub.aclose()
                raise
            except RedisError as exc:
                log.warning("cluster: rule changes not followed (%s); retrying", exc)
                first = False
            except Exception:
                log.exception("cluster: following rule changes failed")
            try:
                await pubsub.aclose()
            except Exception:
                pass
            await asyncio.sleep(1.0)

    async def _apply(self, change: dict[str, Any]) -> None:
        if change.get("origin") == self.link.name:
            return
        kind = self.kinds.get(change.get("kind", ""))
        if kind is None:
            return
        actor = Actor(f"cluster:{change['origin']}")
        if change["op"] == "create":
            raw = await self.redis.hget(RULES, change["id"])
            if raw is not None:
                await kind.adopt(orjson.loads(raw), actor)
        elif change["op"] == "cancel":
            await kind.cancel(change["id"], actor)
        elif change["op"] == "apply":
            await kind.apply(change["id"], actor)  # type: ignore[attr-defined]
        elif change["op"] == "restore":
            await kind.restore(change["id"], actor)  # type: ignore[attr-defined]
        async with self.redis.pipeline(transaction=True) as p:
            p.hset(_acks(change["change"]), self.link.name, "confirmed")
            p.expire(_acks(change["change"]), 60)
            await p.execute()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
