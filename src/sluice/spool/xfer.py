"""The spool's side of xfer: moving messages to another node.

On the source, an xfer is a row of ``xfers``; the messages it takes leave
their queues (state XFER, ``xfer_key`` the xfer's rowid), go out in batches
(state XFER_SENT, stored before the batch is sent), and are deleted, with
their AdminRebind records, only once the target answered that it holds
them. A batch that got no answer is sent again; the target recognizes what
it already stored (``xfer_seen``), so nothing is stored twice and nothing
is lost, also across ``kill -9`` of either node.

``XferSpool`` is a part of ``SqliteSpool`` (which inherits it): the same
writer, reader and queue index.
"""

from __future__ import annotations

import sqlite3
import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from .base import STORED_COLUMNS as _COLS
from .base import Inbound, MessageFilter, PackFn, Stored
from .where import where_sql

if TYPE_CHECKING:
    from .index import QueueIndex

# What the target remembers of each transfer, for recognizing a batch sent again.
SEEN_SECONDS = 7 * 86400.0

def _in(n: int) -> str:
    return ", ".join("?" * n)


class XferSpool:
    """The xfer calls of ``SqliteSpool`` (see the module docstring)."""

    index: QueueIndex
    retain: bool

    if TYPE_CHECKING:
        from collections.abc import Callable

        def _submit(self, op: Callable[[sqlite3.Connection], Any]) -> Any: ...
        async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any: ...
        def _add_records(self, conn: sqlite3.Connection, records: list[bytes]) -> None: ...
        def _add_audit(self, conn: sqlite3.Connection, entry: bytes | None) -> None: ...
        def _rule_key(self, conn: sqlite3.Connection, rule_id: str) -> int | None: ...
        def _count_caught(self, conn: sqlite3.Connection, items: Iterable[Inbound]) -> None: ...
        def _index_stored(self, stored: Iterable[Inbound]) -> None: ...
        def _retained(self, when: float, size: int) -> None: ...

    # -- the source --------------------------------------------------------

    async def add_xfer(self, xfer: dict[str, Any], entry: bytes | None) -> None:
        """Store a new xfer (id, target, reason, criteria, created), audited."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO xfers(id, target, reason, criteria, created)"
                         " VALUES (?, ?, ?, ?, ?)",
                         (xfer["id"], xfer["target"], xfer["reason"],
                          orjson.dumps(xfer["criteria"]).decode(), xfer["created"]))
            self._add_audit(conn, entry)

        await self._submit(op)

    async def end_xfer(self, xfer_id: str, cancelled: bool = False,
                       entry: bytes | None = None) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE xfers SET ended = coalesce(ended, ?), cancelled = ? WHERE id = ?",
                         (time.time(), int(cancelled), xfer_id))
            self._add_audit(conn, entry)

        await self._submit(op)

    async def list_xfers(self, active_only: bool = False) -> list[dict[str, Any]]:
        """Xfers with their counts: ``waiting`` (taken, not sent yet), ``sent``
        (sent, not confirmed), ``moved``, ``returned`` (by a cancel)."""

        def read(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT rowid, id, target, reason, criteria, created, ended, cancelled, moved,"
                " returned"
                " FROM xfers" + (" WHERE ended IS NULL" if active_only else "")
                + " ORDER BY created").fetchall()
            out = []
            for key, xid, target, reason, crit, created, ended, cancelled, moved, returned in rows:
                counts = dict(conn.execute(
                    "SELECT state, count(*) FROM messages WHERE xfer_key = ? AND state IN (4, 5)"
                    " GROUP BY state", (key,)).fetchall())
                out.append({"id": xid, "target": target, "reason": reason,
                            "criteria": orjson.loads(crit), "created": created, "ended": ended,
                            "cancelled": bool(cancelled),
                            "waiting": counts.get(4, 0), "sent": counts.get(5, 0),
                            "moved": moved, "returned": returned})
            return out

        return await self._read(read)

    @staticmethod
    def _xfer_key(conn: sqlite3.Connection, xfer_id: str) -> int:
        row = conn.execute("SELECT rowid FROM xfers WHERE id = ?", (xfer_id,)).fetchone()
        if row is None:
            raise KeyError(xfer_id)
        return row[0]

    async def take_for_xfer(self, xfer_id: str, queues: Collection[str], limit: int,
                            where: MessageFilter | None) -> tuple[dict[str, int], list[str]]:
        """Take up to ``limit`` scheduled or held messages of ``queues`` that
        ``where`` selects out of their queues for xfer ``xfer_id``; per-queue
        counts, and the queues that have nothing more to take. Claimed ones
        are on their way to a destination and stay."""
        names = list(queues)
        clause, params = where_sql(where)

        def op(conn: sqlite3.Connection) -> tuple[dict[str, int], list[str]]:
            key = self._xfer_key(conn, xfer_id)
            taken: dict[str, int] = {}
            exhausted: list[str] = []
            left = limit
            for name in names:
                if left <= 0:
                    break
                n = conn.execute(
                    "UPDATE messages SET state = 4, xfer_key = ? WHERE id IN (SELECT id FROM"
                    f" messages WHERE queue = ? AND state IN (0, 2){clause} LIMIT ?)",
                    (key, name, *params, left)).rowcount
                if n < left:
                    exhausted.append(name)
                if n:
                    taken[name] = n
                    left -= n
            return taken, exhausted

        taken, exhausted = await self._submit(op)
        for name, n in taken.items():
            self.index.remove(name, n)
        return taken, exhausted

    async def next_batch(self, xfer_id: str, limit: int, max_bytes: int,
                         again: bool = False) -> list[Stored]:
        """The next batch to send: up to ``limit`` messages (and about
        ``max_bytes``, at least one) that wait, now marked sent; with
        ``again``, messages sent before and not confirmed."""

        def op(conn: sqlite3.Connection) -> list[Stored]:
            key = self._xfer_key(conn, xfer_id)
            state = 5 if again else 4
            rows = conn.execute(f"SELECT {_COLS} FROM messages WHERE xfer_key = ? AND state = ?"
                                " LIMIT ?", (key, state, limit)).fetchall()
            batch, size = [], 0
            for r in rows:
                if batch and size + r[5] > max_bytes:
                    break
                batch.append(r)
                size += r[5]
            if not again and batch:
                conn.execute(f"UPDATE messages SET state = 5 WHERE id IN ({_in(len(batch))})",
                             [r[0] for r in batch])
            return [Stored(*r) for r in batch]

        return await self._submit(op)

    async def load_bodies(self, body_ids: Collection[int]) -> dict[int, bytes]:
        ids = list(body_ids)
        return await self._read(lambda c: dict(c.execute(
            f"SELECT id, data FROM bodies WHERE id IN ({_in(len(ids))})", ids).fetchall()))

    async def xfer_done(self, xfer_id: str, msgs: Sequence[Stored], pack: PackFn) -> int:
        """The target holds ``msgs``: delete them here, with their records."""

        def op(conn: sqlite3.Connection) -> int:
            gone = [Stored(*r) for r in conn.execute(
                f"DELETE FROM messages WHERE id IN ({_in(len(msgs))}) AND state = 5"
                f" RETURNING {_COLS}", [m.id for m in msgs]).fetchall()]
            if gone:
                packed = pack(gone)
                if packed is not None:
                    self._add_records(conn, [packed])
                conn.execute("UPDATE xfers SET moved = moved + ? WHERE id = ?",
                             (len(gone), xfer_id))
            return len(gone)

        return await self._submit(op)

    async def give_back(self, xfer_id: str, limit: int, pack: PackFn,
                        held: Collection[str]) -> dict[str, int]:
        """Put up to ``limit`` messages xfer ``xfer_id`` took and has not sent
        back into their queues (held ones' queues: ``held``), with records;
        per-queue counts."""

        def op(conn: sqlite3.Connection) -> dict[str, int]:
            key = self._xfer_key(conn, xfer_id)
            msgs = [Stored(*r) for r in conn.execute(
                "UPDATE messages SET state = 0, xfer_key = NULL WHERE id IN (SELECT id FROM"
                f" messages WHERE xfer_key = ? AND state = 4 LIMIT ?) RETURNING {_COLS}",
                (key, limit)).fetchall()]
            per_queue: dict[str, int] = defaultdict(int)
            for m in msgs:
                per_queue[m.queue] += 1
            for q in per_queue.keys() & set(held):
                conn.execute("UPDATE messages SET state = 2 WHERE queue = ? AND state = 0", (q,))
            if msgs:
                packed = pack(msgs)
                if packed is not None:
                    self._add_records(conn, [packed])
                conn.execute("UPDATE xfers SET returned = returned + ? WHERE id = ?",
                             (len(msgs), xfer_id))
            return dict(per_queue)

        back = await self._submit(op)
        for name, n in back.items():
            self.index.add(name, n)
        return back

    # -- the target --------------------------------------------------------

    async def receive_transferred(self, xfer_id: str, bodies: list[bytes],
                                  items: list[Inbound]) -> list[Inbound]:
        """Store what xfer ``xfer_id`` of another node sent, in one commit:
        each item not already held here or recognized as sent before by the
        same xfer, queued (or held, or retained if a bounce rule caught it),
        with its due time and attempts and its records. Returns the items
        that were new."""
        retain = self.retain
        now = time.time()

        def op(conn: sqlite3.Connection) -> tuple[list[Inbound], list[Inbound]]:
            ids = [i.id for i in items]
            known = {r for (r,) in conn.execute(
                f"SELECT id FROM xfer_seen WHERE xfer = ? AND id IN ({_in(len(ids))})",
                (xfer_id, *ids))}
            known.update(r for (r,) in conn.execute(
                f"SELECT id FROM messages WHERE id IN ({_in(len(ids))})", ids))
            fresh = [i for i in items if i.id not in known]
            stored = [i for i in fresh if not i.terminal or (retain and i.rule_id)]
            refs: dict[int, int] = defaultdict(int)
            for i in stored:
                refs[i.body] += 1
            body_ids = {b: conn.execute("INSERT INTO bodies(data, refs) VALUES (?, ?)",
                                        (bodies[b], n)).lastrowid for b, n in refs.items()}
            conn.executemany("INSERT OR IGNORE INTO queues VALUES (?, ?, ?, ?, ?)",
                             [(str(q), q.domain, q.campaign, q.tenant, q.routing_domain)
                              for q in {i.queue for i in stored}])
            conn.executemany(
                "INSERT INTO messages(id, queue, sender, recipient, body_id, size, created, due,"
                " attempts, state, protocol, rule_key, bounced_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(i.id, str(i.queue), i.sender, i.recipient, body_ids[i.body], len(bodies[i.body]),
                  i.created, i.due if i.due is not None else i.created, i.attempts,
                  3 if i.terminal else 2 if i.held else 0, i.protocol,
                  self._rule_key(conn, i.rule_id) if i.terminal and i.rule_id else None,
                  now if i.terminal else None) for i in stored])
            conn.executemany("INSERT INTO xfer_seen(id, xfer, at) VALUES (?, ?, ?)",
                             [(i.id, xfer_id, now) for i in fresh])
            self._add_records(conn, [r for i in fresh for r in i.records])
            self._count_caught(conn, fresh)
            return fresh, stored

        fresh, stored = await self._submit(op)
        for i in stored:
            if i.terminal:
                self._retained(now, len(bodies[i.body]))
        self._index_stored(stored)
        return fresh

    async def forget_seen(self, before: float) -> int:
        """Forget which transferred ids arrived before ``before``."""
        return await self._submit(lambda c: c.execute(
            "DELETE FROM xfer_seen WHERE at < ?", (before,)).rowcount)
