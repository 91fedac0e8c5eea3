"""xfer: move matching queued mail to another node over its HTTP API.

An xfer (``Transfers.create``) is stored, then runs in a task of its own:

1. *Take*: chunk by chunk, matching scheduled and held messages leave their
   queues (``spool.take_for_xfer``); claimed ones are on their way to a
   destination and stay. When everything is sent, it looks once more (mail
   that came back from a failed attempt) until nothing matches.
2. *Send*: ``SENDERS`` tasks each mark a batch sent (``spool.next_batch``,
   committed before the POST) and POST it, with the bodies, to the target's
   ``sluice.xfer.RECEIVE_PATH``. Only when the target answers that it holds
   every message of the batch (stored durably, or already held) are they
   deleted here, with one AdminRebind record each (``spool.xfer_done``). A
   batch without an answer is sent again until one comes; the target
   recognizes what it has, so a message is never lost and never stored
   twice, also when either node is killed (a restart sends the unconfirmed
   batches first).
3. A cancel (``Transfers.cancel``) stops the taking and gives back what was
   taken and not sent (AdminRebind records again); batches already sent
   still finish moving, since the target may hold them.

The source authenticates like any API client: from a trusted host of the
target, or with ``[cluster] token``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from .. import audit
from ..audit import SERVER, Actor
from ..logs import ADMIN_REBIND, Response, pack_records
from ..rules.criteria import Criteria
from ..spool import SqliteSpool, Stored
from ..spool.xfer import SEEN_SECONDS
from ..xfer import CONTENT_TYPE, RECEIVE_PATH, XferBatch, XferMessage, XferReceipt, encode

log = logging.getLogger(__name__)

TAKE_CHUNK = 2000
BATCH = 500
BATCH_BYTES = 8 << 20
SENDERS = 2
RETRY_FIRST, RETRY_MAX = 0.5, 10.0
POST_TIMEOUT = 60.0
QUEUE_SUFFIX = ".xfer.kumomta.internal"


class TargetError(Exception):
    """The target cannot take the xfer (unreachable, refused us, or is this node)."""

    def __init__(self, text: str, status: int | None = None) -> None:
        super().__init__(text)
        self.status = status  # the target's HTTP status, when it answered


def queue_name(target: str) -> str:
    """KumoMTA's name of the xfer queue to ``target``."""
    return target + QUEUE_SUFFIX


def rebind_response(target: str, reason: str) -> Response:
    return Response(250, f"Transferred to {target}: {reason}", (2, 0, 0))


def give_back_response(target: str, reason: str) -> Response:
    return Response(250, f"Transfer to {target} cancelled: {reason}", (2, 0, 0))


@dataclass(eq=False)
class Xfer:
    id: str
    target: str
    reason: str
    criteria: Criteria
    ended: float | None = None
    cancelled: bool = False
    error: str | None = None
    task: asyncio.Task | None = None
    more: asyncio.Event = field(default_factory=asyncio.Event)  # a take added mail to send
    taking: bool = True   # senders wait for more while the take runs
    take_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one take step at a time


class Transfers:
    """The xfers of this node (see the module docstring)."""

    def __init__(self, spool: SqliteSpool, nodeid: str, stats: Counter[str],
                 token: str | None, wake: Any = None) -> None:
        self.spool = spool
        self.nodeid = nodeid
        self.stats = stats
        self.wake = wake  # mail given back may be due
        self._headers = {"Content-Type": CONTENT_TYPE}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._client: httpx.AsyncClient | None = None
        self._xfers: dict[str, Xfer] = {}
        self._forgetter: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Go on with the xfers a stop or a crash interrupted (and finish
        sending the batches a cancelled one had sent)."""
        for row in await self.spool.list_xfers():
            if row["ended"] is None or row["sent"]:
                x = Xfer(row["id"], row["target"], row["reason"],
                         Criteria.from_dict(row["criteria"]), ended=row["ended"],
                         cancelled=row["ended"] is not None, taking=row["ended"] is None)
                self._run(x)
        self._forgetter = asyncio.create_task(self._forget_loop(), name="xfer-forget")

    async def stop(self) -> None:
        tasks = [x.task for x in self._xfers.values() if x.task is not None]
        if self._forgetter is not None:
            tasks.append(self._forgetter)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._client is not None:
            await self._client.aclose()

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(POST_TIMEOUT, connect=5.0),
                                             headers=self._headers)
        return self._client

    # -- operator calls ----------------------------------------------------

    async def create(self, criteria: Criteria, target: str, reason: str, actor: Actor = SERVER,
                     request: Any = None) -> Xfer:
        """Check that the target takes xfers from this node (TargetError if
        not), store the xfer (audited), and start it."""
        await self._post(target, XferBatch(xfer=str(uuid.uuid4()), source=self.nodeid,
                                           bodies=[], messages=[]))
        x = Xfer(str(uuid.uuid4()), target, reason, criteria)
        matched = self.spool.index.matching(criteria)
        await self.spool.add_xfer(
            {"id": x.id, "target": target, "reason": reason, "criteria": criteria.as_dict(),
             "created": time.time()},
            audit.entry("xfer", actor, rule_id=x.id, request=request, matched=matched,
                        result={"id": x.id, "target": target}))
        self._run(x)
        return x

    def find(self, xfer_id: str | None = None, target: str | None = None) -> list[Xfer]:
        """The running xfers with this id, or to this target."""
        return [x for x in self._xfers.values() if x.ended is None
                and (x.id == xfer_id or (target is not None and x.target == target))]

    async def cancel(self, xfers: list[Xfer], reason: str, actor: Actor = SERVER,
                     request: Any = None) -> tuple[dict[str, int], int]:
        """Stop ``xfers``: give back what they took and did not send; returns
        what went back per queue, and how many are sent (still moving)."""
        back: Counter[str] = Counter()
        for x in xfers:
            x.cancelled = True
            x.ended = time.time()
            x.more.set()
        for x in xfers:
            async with x.take_lock:  # a take step under way ends first; none starts after
                pass
            response = give_back_response(x.target, reason)
            while chunk := await self.spool.give_back(
                    x.id, TAKE_CHUNK, lambda msgs, r=response: self._pack(r, msgs),
                    self.spool.index.held()):
                back.update(chunk)
                if self.wake is not None:
                    self.wake()
        rows = {r["id"]: r for r in await self.spool.list_xfers()}
        in_flight = sum(rows[x.id]["sent"] for x in xfers if x.id in rows)
        for x in xfers:
            await self.spool.end_xfer(x.id, True, audit.entry(
                "xfer-cancel", actor, rule_id=x.id, request=request,
                result={"returned": sum(back.values()), "in_flight": in_flight}))
        return dict(back), in_flight

    async def list(self) -> list[dict[str, Any]]:
        out = []
        for row in await self.spool.list_xfers():
            x = self._xfers.get(row["id"])
            state = ("cancelled" if row["cancelled"] else "running" if row["ended"] is None
                     else "done")
            out.append({**row, "queue_name": queue_name(row["target"]), "state": state,
                        "error": x.error if x is not None else None})
        return out

    # -- the work ----------------------------------------------------------

    def _run(self, x: Xfer) -> None:
        self._xfers[x.id] = x
        x.task = asyncio.create_task(self._work(x), name=f"xfer-{x.id}")

    async def _work(self, x: Xfer) -> None:
        try:
            # What was sent before a crash, first: the target may hold it already.
            while batch := await self.spool.next_batch(x.id, BATCH, BATCH_BYTES, again=True):
                await self._deliver(x, batch)
            for _ in range(10):  # rounds: mail back from a failed attempt is taken next round
                senders = [asyncio.create_task(self._sender(x)) for _ in range(SENDERS)]
                try:
                    took = await self._take(x)
                finally:
                    x.taking = False
                    x.more.set()
                await asyncio.gather(*senders)
                if x.cancelled or not took:
                    break
                x.taking = True
            if not x.cancelled:
                x.ended = time.time()
                await self.spool.end_xfer(x.id, False)
                log.info("xfer %s to %s done", x.id, x.target)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("xfer %s failed", x.id)
            x.error = "internal error (see the server log)"

    async def _take(self, x: Xfer) -> int:
        """Take every matching message out of its queue; how many."""
        done: set[str] = set()
        took = 0
        where = x.criteria.message_filter()
        while True:
            async with x.take_lock:
                if x.cancelled:
                    break
                queues = [q for q in self.spool.index.matching(x.criteria) if q not in done]
                if not queues:
                    break
                taken, exhausted = await self.spool.take_for_xfer(x.id, queues, TAKE_CHUNK,
                                                                  where)
            done.update(exhausted)
            took += sum(taken.values())
            x.more.set()
            await asyncio.sleep(0)
        return took

    async def _sender(self, x: Xfer) -> None:
        while not x.cancelled:
            batch = await self.spool.next_batch(x.id, BATCH, BATCH_BYTES)
            if batch:
                await self._deliver(x, batch)
                continue
            if not x.taking:
                return
            x.more.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(x.more.wait(), 0.5)

    async def _deliver(self, x: Xfer, msgs: list[Stored]) -> None:
        """Send one batch until the target holds it, then delete it here. A
        batch too large for the target's request limit goes in halves."""
        bodies = await self.spool.load_bodies({m.body_id for m in msgs})
        order = {b: n for n, b in enumerate(bodies)}
        batch = XferBatch(xfer=x.id, source=self.nodeid, bodies=list(bodies.values()),
                          messages=[XferMessage(m.id, m.queue, m.sender, m.recipient,
                                                order[m.body_id], m.created, m.due, m.attempts,
                                                m.protocol) for m in msgs])
        pause = RETRY_FIRST
        while True:
            try:
                await self._post(x.target, batch)
                x.error = None
                break
            except TargetError as exc:
                if exc.status == 413 and len(msgs) > 1:
                    half = len(msgs) // 2
                    await self._deliver(x, msgs[:half])
                    await self._deliver(x, msgs[half:])
                    return
                x.error = str(exc)
                log.warning("xfer %s: %s; sending again in %.1fs", x.id, exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX)
        response = rebind_response(x.target, x.reason)
        n = await self.spool.xfer_done(x.id, msgs, lambda gone: self._pack(response, gone))
        self.stats[ADMIN_REBIND] += n

    async def _post(self, target: str, batch: XferBatch) -> XferReceipt:
        try:
            resp = await self.client().post(target + RECEIVE_PATH, content=encode(batch))
        except httpx.HTTPError as exc:
            raise TargetError(f"cannot reach {target}: {exc or type(exc).__name__}") from None
        if resp.status_code != 200:
            try:
                text = resp.json().get("error") or resp.text
            except ValueError:
                text = resp.text
            hint = (" (send from one of its trusted_hosts, or set [cluster] token to one of its "
                    "tokens)" if resp.status_code == 401 else "")
            raise TargetError(f"{target} answered {resp.status_code}: {text[:200]}{hint}",
                              resp.status_code)
        try:
            receipt = XferReceipt(**resp.json())
        except (ValueError, TypeError):
            raise TargetError(f"{target} gave an answer that is not an xfer receipt") from None
        if receipt.node == self.nodeid:
            raise TargetError(f"{target} is this node")
        return receipt

    def _pack(self, response: Response, msgs: list[Stored]) -> bytes:
        rows = [(m.id, m.sender, m.recipient, m.queue, m.size, m.created, m.attempts, m.protocol)
                for m in msgs]
        index = self.spool.index
        return pack_records(ADMIN_REBIND, response, self.nodeid,
                            {q: index.parts(q).meta() for q in {m.queue for m in msgs}}, rows)

    async def _forget_loop(self) -> None:
        while True:
            await asyncio.sleep(3600)
            with contextlib.suppress(Exception):
                await self.spool.forget_seen(time.time() - SEEN_SECONDS)
