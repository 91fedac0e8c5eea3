"""A node's link to its cluster: membership and published figures, in Redis.

With ``[cluster] redis_url``, each node keeps a hash ``sluice:node:<name>``
(its node id, HTTP endpoint, start time, last heartbeat and queue figures)
that expires unless renewed: a node is *live* while its hash exists. The
set ``sluice:nodes`` names every node that has joined; a name whose hash has
expired is dropped from it when someone lists the nodes. Every
``HEARTBEAT`` seconds the node rewrites its hash (one pipelined
transaction), so the figures a cluster view shows are at most that old.

Node names are unique: a node does not start while another live node holds
its name with another node id. When Redis cannot be reached, the node still
serves (every node keeps its own spool); its heartbeat retries, and cluster
views answer 503 until Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..config import ConfigError

log = logging.getLogger(__name__)

HEARTBEAT = 2.0        # seconds between two writes of a node's hash
EXPIRY = 10            # seconds without a heartbeat after which a node is not live
NODES = "sluice:nodes"


def node_key(name: str) -> str:
    return f"sluice:node:{name}"


class ClusterUnavailable(Exception):
    """Redis cannot be reached: cluster views and writes answer 503."""


class ClusterLink:
    """This node's membership (see the module docstring). ``figures`` gives
    what the node publishes: its ``/metrics.json`` figures."""

    def __init__(self, url: str, name: str, nodeid: str, http: str,
                 figures: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self.url = url
        self.name = name
        self.nodeid = nodeid
        self.http = http
        self.figures = figures
        self.started = time.time()
        self.redis = aioredis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._task: asyncio.Task | None = None
        self.reachable = False

    async def start(self) -> None:
        """Join: check that the name is free, write the first heartbeat, and
        keep beating. Redis down: a warning, and the heartbeat keeps trying."""
        try:
            other = await self.redis.hget(node_key(self.name), "nodeid")
            if other is not None and other.decode() != self.nodeid:
                raise ConfigError(f"server.node_name {self.name!r} is in use by another live "
                                  f"node of the cluster at {self.url} (node id {other.decode()})")
            await self.beat()
        except RedisError as exc:
            log.warning("cluster: Redis at %s cannot be reached (%s); serving alone until it "
                        "can", self.url, exc)
        self._task = asyncio.create_task(self._beat_loop(), name="cluster-heartbeat")

    async def beat(self) -> None:
        """Write this node's hash and renew its expiry (one transaction)."""
        figures = await self.figures()
        async with self.redis.pipeline(transaction=True) as p:
            p.hset(node_key(self.name), mapping={
                "nodeid": self.nodeid, "name": self.name, "http": self.http,
                "started": self.started, "last_seen": time.time(),
                "figures": orjson.dumps(figures)})
            p.expire(node_key(self.name), EXPIRY)
            p.sadd(NODES, self.name)
            await p.execute()
        if not self.reachable:
            log.warning("cluster: joined through Redis at %s as %r", self.url, self.name)
        self.reachable = True

    async def _beat_loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                await self.beat()
            except RedisError as exc:
                if self.reachable:
                    log.warning("cluster: Redis at %s cannot be reached: %s", self.url, exc)
                self.reachable = False
            except Exception:
                log.exception("cluster: heartbeat failed")

    async def nodes(self) -> list[dict[str, Any]]:
        """The live nodes, by name, with what each last published."""
        try:
            names = sorted(n.decode() for n in await self.redis.smembers(NODES))
            async with self.redis.pipeline(transaction=False) as p:
                for name in names:
                    p.hgetall(node_key(name))
                rows = await p.execute()
            gone = [name for name, row in zip(names, rows) if not row]
            if gone:
                await self.redis.srem(NODES, *gone)
        except RedisError as exc:
            raise ClusterUnavailable(f"Redis at {self.url} cannot be reached: {exc}") from None
        now = time.time()
        out = []
        for row in rows:
            if not row:
                continue
            r = {k.decode(): v for k, v in row.items()}
            last = float(r["last_seen"])
            out.append({"name": r["name"].decode(), "nodeid": r["nodeid"].decode(),
                        "http": r["http"].decode(), "started": float(r["started"]),
                        "last_seen": last, "seconds_since": round(max(0.0, now - last), 3),
                        "figures": orjson.loads(r["figures"])})
        return out

    async def stop(self) -> None:
        """Leave: stop beating and remove this node's hash (a node killed
        without this is dropped when its hash expires)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            async with self.redis.pipeline(transaction=True) as p:
                p.delete(node_key(self.name))
                p.srem(NODES, self.name)
                await p.execute()
        except RedisError:
            pass
        await self.redis.aclose()
