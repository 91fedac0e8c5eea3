"""Wiring and lifecycle: build the parts, start them in order, stop them gracefully.

Start order matters: every listening socket is bound first (a taken port
stops the start before anything happens), then the spool opens and the
rules load, and only then is anyone served (a rule that was in force before
a restart is in force for the first message after it). Stop order is the
reverse: listeners close first, then deliveries under way get a few seconds
to finish, the rest is put back. docs/ARCHITECTURE.md has the whole map.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import uvicorn

from .api.app import create_app
from .cluster.link import ClusterLink
from .cluster.rules import ClusterRules
from .cluster.xfer import Transfers
from .config import Settings, split_host_port
from .delivery.mx import MxResolver
from .delivery.process import DeliveryProcess
from .delivery.routes import Router
from .node import NodeIdError, node_id
from .queues.manager import QueueManager
from .reception.intake import Intake
from .reception.pool import WorkerPool
from .reception.smtp import ReceptionHandler, credentials, dkim_signer, start_smtp
from .reception.tls import ensure_certificate
from .rules.automation import Automations
from .rules.bounce import Bounces
from .rules.suspend import Suspensions
from .spool import SqliteSpool

if TYPE_CHECKING:
    from .reception.dkim import DkimSigner

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 6.0
PRUNE_SECONDS = 5.0


@dataclass
class Services:
    """The parts the API reaches."""

    settings: Settings
    spool: SqliteSpool
    bounces: Bounces
    suspensions: Suspensions
    manager: QueueManager
    intake: Intake
    stats: Counter[str]
    dkim: DkimSigner | None   # None: no domain has a key
    transfers: Transfers
    cluster: ClusterLink | None = None  # None: not in a cluster
    cluster_rules: ClusterRules | None = None

    async def figures(self) -> dict[str, Any]:
        """This node's queue figures (``/metrics.json``)."""
        return {"scheduled": self.spool.index.counts(),
                "ready": await self.manager.delivery.figures()}

    async def published(self) -> dict[str, Any]:
        """What this node publishes to its cluster with each heartbeat: its
        queue figures and what each bounce rule in force bounced here."""
        return {**await self.figures(),
                "bounced": {r.id: self.bounces.counts(r) for r in self.bounces.active()}}


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: Sluice stops it."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


class StartupError(Exception):
    """Sluice cannot start; the message names the configuration key and why."""


def bind_listener(key: str, listen: str) -> socket.socket:
    """A listening socket for ``listen`` (the value of config key ``key``).

    Bound once, by the main process, without SO_REUSEPORT: a port that
    another program (or another Sluice) holds is an error, never a share.
    Sluice's own reception processes get this very socket.
    """
    host, port = split_host_port(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"{key} {listen}: address in use (another program is "
                               "listening there)") from None
        raise StartupError(f"{key} {listen}: cannot listen: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


class Server:
    def __init__(self, settings: Settings, mx: MxResolver | None = None) -> None:
        self.settings = settings
        try:
            nodeid = node_id(settings.data_path)  # made here, before any part or child needs it
        except (OSError, NodeIdError) as exc:
            raise StartupError(f"server.data_dir {settings.server.data_dir}: {exc}") from None
        # The DKIM keys before anything is bound or opened: a key that cannot
        # be used is a bad configuration (ConfigError), and nothing listens.
        dkim = dkim_signer(settings)
        credentials(settings)  # likewise: a bad auth_file line stops the start
        spool = SqliteSpool(settings.data_path)
        router = Router(settings.routes,
                        mx or MxResolver(nameservers=settings.delivery.nameservers))
        stats: Counter[str] = Counter()
        bounces = Bounces(spool, nodeid, stats, settings.admin)
        suspensions = Suspensions(spool)
        manager = QueueManager(settings, spool, bounces, suspensions, router, stats, nodeid)
        self.workers: WorkerPool | None = None
        self.delivery: DeliveryProcess | None = None
        if settings.server.workers > 0:
            self.delivery = manager.delivery = DeliveryProcess(settings, manager)
        bounces.delivery = manager.delivery
        manager.automation = Automations(settings, bounces, suspensions,
                                         delivery=lambda: manager.delivery)
        bounces.changed = suspensions.changed = self._rules_changed
        bounces.holds_changed = suspensions.update_holds
        bounces.wake = suspensions.on_release = manager.wake
        suspensions.also_held.append(bounces.holds_queue)  # a bounce rule in its grace
        intake = Intake(settings, spool, bounces, suspensions, nodeid, stats,
                        on_received=lambda queued: manager.wake())
        transfers = Transfers(spool, nodeid, stats, settings.cluster.token, wake=manager.wake)
        self.services = Services(settings, spool, bounces, suspensions, manager, intake, stats,
                                 dkim, transfers)
        self._pruner: asyncio.Task | None = None
        self._smtp_sockets: list[socket.socket] = []
        self._smtp_servers: list[asyncio.base_events.Server] = []
        self._http: _Uvicorn | None = None
        self._http_task: asyncio.Task | None = None
        self._sessions: weakref.WeakSet = weakref.WeakSet()

    async def start(self) -> None:
        s = self.services
        # Every listener first: a port that is taken stops the start before
        # anything else happens. Nobody is served until the rules are loaded.
        http_sockets = [bind_listener("http.listen", listen) for listen in self.settings.http.listen]
        self._smtp_sockets = [bind_listener("smtp.listen", listen)
                              for listen in self.settings.smtp.listen]
        try:
            await s.spool.open()
        except OSError as exc:
            raise StartupError(f"server.data_dir {self.settings.server.data_dir}: cannot open "
                               f"the spool: {exc.strerror or exc}") from None
        # The certificate before any process serves with it (ConfigError).
        ensure_certificate(self.settings)
        # The cluster before anything is served: a node name in use stops the start.
        if self.settings.cluster.redis_url:
            host, port = split_host_port(self.settings.http.listen[0])
            http = f"http://{'127.0.0.1' if host in ('', '0.0.0.0') else host}:{port}"
            s.cluster = ClusterLink(self.settings.cluster.redis_url, self.settings.server.node_name,
                                    s.intake.nodeid, http, s.published)
            await s.cluster.start()
        # The rules before anything that checks them.
        rows = await s.spool.load_rules()
        await s.bounces.load(rows)
        await s.suspensions.load(rows)
        await s.bounces.start_retention()
        await s.manager.delivery.rules_changed(s.bounces.active(), s.suspensions.active())
        if self.delivery is not None:
            await self.delivery.start()
        s.manager.start()
        if s.cluster is not None:  # the cluster's rules before anyone is served
            s.cluster_rules = ClusterRules(s.cluster, {"bounce": s.bounces,
                                                       "suspend": s.suspensions})
            await s.cluster_rules.start()
            if s.manager.automation is not None:  # automatic rules hold cluster-wide too
                s.manager.automation.share = s.cluster_rules.created
        await s.transfers.start()
        self._pruner = asyncio.create_task(self._prune_loop(), name="rule-pruner")
        config = uvicorn.Config(create_app(s), log_level="warning", lifespan="off",
                                access_log=False, limit_concurrency=1000)
        self._http = _Uvicorn(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=http_sockets), name="http")
        while not self._http.started:
            if self._http_task.done():
                await self._http_task
                raise RuntimeError("HTTP listener failed to start")
            await asyncio.sleep(0.01)
        # SMTP last: once mail can come in, everything it needs is running.
        if self.settings.server.workers > 0:
            self.workers = WorkerPool(self.settings, self.settings.server.workers, s.intake,
                                      self._smtp_sockets)
            await self.workers.start()
        else:
            handler = ReceptionHandler(self.settings, s.intake)
            for sock in self._smtp_sockets:
                self._smtp_servers.append(
                    await start_smtp(self.settings, handler, sock, self._sessions))
        log.info("sluice started: smtp %s, http %s", self.settings.smtp.listen,
                 self.settings.http.listen)

    async def _rules_changed(self) -> None:
        """A rule came or went: in force where mail is sent before the API
        answers, then promotion looks again."""
        s = self.services
        await s.manager.delivery.rules_changed(s.bounces.active(), s.suspensions.active())
        s.manager.wake()

    async def _prune_loop(self) -> None:
        s = self.services
        while True:
            await asyncio.sleep(PRUNE_SECONDS)
            for kind in (s.bounces, s.suspensions):
                try:
                    await kind.prune()
                except Exception:
                    log.exception("pruning expired %s rules failed", kind.kind)

    async def stop(self) -> None:
        s = self.services
        if self.workers is not None:
            await self.workers.stop()
        for srv in self._smtp_servers:
            srv.close()
        for sock in self._smtp_sockets:
            sock.close()
        if self._http is not None:
            self._http.should_exit = True
        # Sessions get a moment to finish a message being stored, then close.
        await asyncio.sleep(0.2)
        for proto in list(self._sessions):
            if proto.transport is not None:
                proto.transport.close()
        await s.manager.stop(STOP_GRACE_SECONDS)
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
        await s.bounces.stop()
        await s.transfers.stop()
        if s.cluster_rules is not None:
            await s.cluster_rules.stop()
        if s.cluster is not None:
            await s.cluster.stop()
        if s.manager.automation is not None:
            await s.manager.automation.stop()
        if self._http_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, 2.0)
        for srv in self._smtp_servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 0.5)
        await s.spool.close()
