"""The embedded spool: one SQLite database in WAL mode, one writer thread.

All writes go through ``_Writer``: callers submit small functions, the writer
runs every function waiting at that moment in one transaction (each in its
own savepoint) and commits once with ``synchronous=FULL``; that single fsync
acknowledges them all (group commit). Reads use a separate connection on a
reader thread. Memory holds per-queue counters, never per-message objects
(docs/ARCHITECTURE.md, "Memory").
"""

from __future__ import annotations

import asyncio
import contextlib
import queue as queue_mod
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..logs import AUDIT, LogWriter
from ..message import QueueName, glob_match
from .base import STORED_COLUMNS as _COLS
from .base import Inbound, MessageFilter, PackFn, Stored
from .index import QueueIndex
from .where import where_sql as _where
from .xfer import XferSpool

SCHEDULED = 0   # waiting in its scheduled queue until due
CLAIMED = 1     # promoted: in a ready queue or being delivered
HELD = 2        # its queue is suspended; not considered for promotion
RETAINED = 3    # admin-bounced, kept for a restore (``rule_key``, ``bounced_at`` say by whom, when)
XFER = 4        # an xfer (``xfer_key``) will move it to another node; out of its queue
XFER_SENT = 5   # sent to that node at least once; leaves when the node confirms it stored it

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bodies (
    id INTEGER PRIMARY KEY,
    data BLOB NOT NULL,
    refs INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    campaign TEXT,
    tenant TEXT,
    routing_domain TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    queue TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    body_id INTEGER NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    due REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    state INTEGER NOT NULL DEFAULT 0,
    protocol TEXT,
    rule_key INTEGER,  -- RETAINED: the rowid of the bounce rule that took it
    bounced_at REAL    -- RETAINED: when
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_queue_state ON messages(queue, state);
CREATE INDEX IF NOT EXISTS messages_scheduled_due ON messages(due) WHERE state = 0;
-- A removed message only notes its body as garbage (an append); bodies are
-- released later in small batches, off the path of sweeps and deliveries.
CREATE TABLE IF NOT EXISTS garbage (body_id INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS messages_note_garbage AFTER DELETE ON messages BEGIN
    INSERT INTO garbage(body_id) VALUES (OLD.body_id);
END;
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    record BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS rules (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    criteria TEXT NOT NULL,
    reason TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    suppress_logging INTEGER NOT NULL DEFAULT 0,
    grace_until REAL NOT NULL DEFAULT 0,
    ended REAL
);
CREATE TABLE IF NOT EXISTS rule_counts (
    rule_id TEXT NOT NULL,
    queue TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (rule_id, queue)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    entry BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS xfers (
    id TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    reason TEXT NOT NULL,
    criteria TEXT NOT NULL,
    created REAL NOT NULL,
    ended REAL,
    cancelled INTEGER NOT NULL DEFAULT 0,
    moved INTEGER NOT NULL DEFAULT 0,
    returned INTEGER NOT NULL DEFAULT 0
);
-- On a target node: which messages each xfer (by its id) brought, so that a
-- batch sent again after a failure or a crash is recognized, not stored twice.
CREATE TABLE IF NOT EXISTS xfer_seen (
    id TEXT NOT NULL,
    xfer TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (id, xfer)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rule_restores (
    rule_id TEXT NOT NULL,
    queue TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (rule_id, queue)
) WITHOUT ROWID;
"""

# Columns added after the first release, for spools made before them.
_ADDED_COLUMNS = {
    "messages": [("protocol", "TEXT"), ("rule_key", "INTEGER"), ("bounced_at", "REAL"),
                 ("xfer_key", "INTEGER")],
    "rules": [("grace_until", "REAL NOT NULL DEFAULT 0"), ("ended", "REAL")],
}

Op = Callable[[sqlite3.Connection], Any]


@dataclass(slots=True)
class Swept:
    """What one sweep step removed, per queue, and which of the queues it was
    given hold nothing more it selects (the next step can skip them)."""

    removed: dict[str, int]
    exhausted: list[str]
    bytes: int = 0  # message sizes removed


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.create_function("sluice_glob", 2, glob_match, deterministic=True)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


class _Writer(threading.Thread):
    """The one thread that writes: batches every queued op into one commit."""

    MAX_BATCH = 2000

    def __init__(self, path: Path, on_commit: Callable[[bool], None]) -> None:
        super().__init__(name="sluice-spool-writer", daemon=True)
        self._path = path
        self._ops: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self._on_commit = on_commit
        self.outbox_dirty = False
        self.commits = 0

    def submit(self, op: Op, loop: asyncio.AbstractEventLoop | None) -> asyncio.Future | None:
        fut = loop.create_future() if loop is not None else None
        self._ops.put((op, fut, loop))
        return fut

    def stop(self) -> None:
        self._ops.put(None)
        self.join()

    def run(self) -> None:
        conn = _connect(self._path)
        # Checkpoint less often: pages written and rewritten between two
        # checkpoints (outbox rows, hot index pages) are copied back once.
        conn.execute("PRAGMA wal_autocheckpoint=8000")
        conn.execute("PRAGMA cache_size=-16384")
        try:
            stopping = False
            while not stopping:
                item = self._ops.get()
                if item is None:
                    break
                batch = [item]
                while len(batch) < self.MAX_BATCH:
                    try:
                        nxt = self._ops.get_nowait()
                    except queue_mod.Empty:
                        break
                    if nxt is None:
                        stopping = True
                        break
                    batch.append(nxt)
                self._run_batch(conn, batch)
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list) -> None:
        self.outbox_dirty = False
        results = []
        conn.execute("BEGIN IMMEDIATE")
        for op, fut, loop in batch:
            conn.execute("SAVEPOINT op")
            try:
                res = op(conn)
            except Exception as exc:  # the op fails alone, the batch goes on
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                results.append((fut, loop, None, exc))
            else:
                conn.execute("RELEASE op")
                results.append((fut, loop, res, None))
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK")
            results = [(f, lp, None, exc) for f, lp, _, _ in results]
        self.commits += 1
        self._on_commit(self.outbox_dirty)
        by_loop: dict[Any, list] = defaultdict(list)
        for fut, loop, res, exc in results:
            if fut is not None:
                by_loop[loop].append((fut, res, exc))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_all, items)
            except RuntimeError:  # loop closed: nobody waits any more
                pass


class SpoolClosed(RuntimeError):
    """The spool is shutting down and takes no more writes."""


def _resolve_all(items: list) -> None:
    for fut, res, exc in items:
        if fut.cancelled():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(res)


def _row(r: tuple) -> Stored:
    return Stored(*r)


class SpoolReader:
    """Reads from the spool on one thread with its own connection.

    The spool uses one for its reads; the delivery process opens its own to
    load the bodies it sends (WAL lets it read while the main process
    writes, and a body is committed before its message can be claimed).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-spool-reader")
        self._conn: sqlite3.Connection | None = None

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the reader thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        def run() -> Any:
            if self._conn is None:
                self._conn = _connect(self.path)
                self._conn.execute("PRAGMA query_only=1")
            return fn(self._conn)
        return await self.run(run)

    async def load_body(self, body_id: int) -> bytes:
        row = await self.read(lambda c: c.execute(
            "SELECT data FROM bodies WHERE id = ?", (body_id,)).fetchone())
        if row is None:
            raise KeyError(body_id)
        return row[0]

    def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        self._thread.submit(shut)
        self._thread.shutdown(wait=True)


class SqliteSpool(XferSpool):
    """The embedded spool. See the module docstring for the threading model.

    ``index`` (the queue index) is kept by the spool alone, after each
    commit. ``in_hand`` holds the ids of the claimed messages that this
    process is delivering: ``claim_due`` adds them in the same step that
    claims them; ``finish``, ``retry`` and ``release`` let them go, and so
    does ``let_go`` when a holder loses one without a spool change. A claimed
    message not in hand is an orphan (``adopt_orphans``).
    """

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "spool"
        self.path = self.dir / "spool.db"
        self.log_dir = Path(data_dir) / "logs"
        self.index = QueueIndex()
        self.in_hand: set[str] = set()
        self.retain = False  # keep what admin bounces remove (RETAINED), for restores
        self.retained_bytes = 0
        self._oldest_retained: float | None = None
        self._rule_keys: dict[str, int | None] = {}
        self._writer: _Writer | None = None
        self._reader = SpoolReader(self.path)
        self._logs: LogWriter | None = None
        self._closing = False
        self._collector: asyncio.Task | None = None
        self._last_sweep = 0.0

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        """Prepare the spool, count the queues, start the writer, the log
        writer and the body collector."""
        self.dir.mkdir(parents=True, exist_ok=True)
        await self._reader.run(self._prepare)
        self._writer = _Writer(self.path, self._committed)
        self._writer.start()
        self._logs = LogWriter(self.path, self.log_dir, self._delete_outbox)
        self._logs.start()
        self._logs.wake()
        self._collector = asyncio.create_task(self._collect_loop(), name="spool-body-collector")

    def _prepare(self) -> None:
        conn = _connect(self.path)
        try:
            conn.executescript(_SCHEMA)
            conn.execute("DROP INDEX IF EXISTS messages_queue_due")  # before messages_queue_state
            for table, added in _ADDED_COLUMNS.items():
                columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                for name, decl in added:
                    if name not in columns:
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
            conn.execute("CREATE INDEX IF NOT EXISTS messages_xfer ON messages(xfer_key, state)"
                         " WHERE state IN (4, 5)")
            # Messages claimed by a previous run were never finished: at least
            # once delivery means they go back to their scheduled queue. Held
            # ones too: holds are recomputed from the rules once they are loaded.
            conn.execute("UPDATE messages SET state = 0 WHERE state IN (1, 2)")
            for name, domain, campaign, tenant, routing in conn.execute(
                    "SELECT name, domain, campaign, tenant, routing_domain FROM queues"):
                self.index.learn(QueueName(domain, campaign, tenant, routing))
            for name, n in conn.execute(
                    "SELECT queue, count(*) FROM messages WHERE state IN (0, 1, 2) GROUP BY queue"):
                self.index.add(name, n)
            self.retained_bytes, self._oldest_retained = conn.execute(
                "SELECT coalesce(sum(size), 0), min(bounced_at) FROM messages WHERE state = 3"
            ).fetchone()
        finally:
            conn.close()

    async def close(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        self._closing = True
        if self._logs is not None:
            # Last drain first: its outbox delete still goes through the writer.
            await asyncio.to_thread(self._logs.stop)
        if self._writer is not None:
            await asyncio.to_thread(self._writer.stop)
        self._reader.close()

    def _committed(self, outbox_dirty: bool) -> None:
        if outbox_dirty and self._logs is not None:
            self._logs.wake()

    def _delete_outbox(self, upto: int) -> None:
        if self._writer is not None and self._writer.is_alive():
            self._writer.submit(lambda c: c.execute("DELETE FROM outbox WHERE seq <= ?", (upto,)), None)

    # -- plumbing ----------------------------------------------------------

    def _submit(self, op: Op) -> asyncio.Future:
        if self._writer is None or self._closing:
            raise SpoolClosed("the spool is closed")
        return self._writer.submit(op, asyncio.get_running_loop())

    def _add_records(self, conn: sqlite3.Connection, records: list[bytes]) -> None:
        # The records of one change go in as one row (JSON lines): one insert
        # and one delete per change instead of one per record.
        if records:
            conn.execute("INSERT INTO outbox(record) VALUES (?)", (b"\n".join(records),))
            assert self._writer is not None
            self._writer.outbox_dirty = True

    def _rule_key(self, conn: sqlite3.Connection, rule_id: str) -> int | None:
        """The small number retained rows carry for rule ``rule_id`` (its rowid)."""
        key = self._rule_keys.get(rule_id)
        if key is None:
            row = conn.execute("SELECT rowid FROM rules WHERE id = ?", (rule_id,)).fetchone()
            key = self._rule_keys[rule_id] = row[0] if row else None
        return key

    def _retained(self, when: float, size: int) -> None:
        self.retained_bytes += size
        if self._oldest_retained is None or when < self._oldest_retained:
            self._oldest_retained = when

    def _add_audit(self, conn: sqlite3.Connection, entry: bytes | None) -> None:
        """An audit entry (one JSON object), kept in the spool and, through the
        outbox, appended to logs/audit.jsonl: in the transaction of its change."""
        if entry is not None:
            conn.execute("INSERT INTO audit(time, entry) VALUES (?, ?)", (time.time(), entry))
            conn.execute("INSERT INTO outbox(record) VALUES (?)", (AUDIT + entry,))
            assert self._writer is not None
            self._writer.outbox_dirty = True

    async def add_audit(self, entry: bytes) -> None:
        """Commit an audit entry that goes with no other change."""
        await self._submit(lambda c: self._add_audit(c, entry))

    async def list_audit(self, since: float | None, limit: int) -> list[bytes]:
        """Audit entries, newest first."""
        return await self._read(lambda c: [e for (e,) in c.execute(
            "SELECT entry FROM audit WHERE time >= ? ORDER BY seq DESC LIMIT ?",
            (since or 0.0, limit))])

    def _count_rule(self, conn: sqlite3.Connection, rule_id: str, per_queue: dict[str, int]) -> None:
        conn.executemany(
            "INSERT INTO rule_counts(rule_id, queue, n) VALUES (?, ?, ?) "
            "ON CONFLICT(rule_id, queue) DO UPDATE SET n = n + excluded.n",
            [(rule_id, q, n) for q, n in per_queue.items()],
        )

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        return await self._reader.read(fn)

    # -- reception ---------------------------------------------------------

    async def receive(self, body: bytes, items: list[Inbound]) -> None:
        """Store the body once and every item: queued (or held), or, for one
        a bounce rule caught, retained when ``retain`` is on (else not stored)."""
        queued = [i for i in items if not i.terminal]
        retained = [i for i in items if i.terminal and i.rule_id] if self.retain else []
        stored = queued + retained
        size = len(body)
        new_queues = [i.queue for i in stored if not self.index.knows(str(i.queue))]

        def state(i: Inbound) -> int:
            return RETAINED if i.terminal else HELD if i.held else SCHEDULED

        def op(conn: sqlite3.Connection) -> None:
            records = [r for i in items for r in i.records]
            if stored:
                body_id = conn.execute("INSERT INTO bodies(data, refs) VALUES (?, ?)",
                                       (body, len(stored))).lastrowid
                if new_queues:
                    conn.executemany("INSERT OR IGNORE INTO queues VALUES (?, ?, ?, ?, ?)",
                                     [(str(q), q.domain, q.campaign, q.tenant, q.routing_domain)
                                      for q in new_queues])
                conn.executemany(
                    "INSERT INTO messages(id, queue, sender, recipient, body_id, size, created, due,"
                    " state, protocol, rule_key, bounced_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(i.id, str(i.queue), i.sender, i.recipient, body_id, size, i.created, i.created,
                      state(i), i.protocol,
                      self._rule_key(conn, i.rule_id) if i.terminal and i.rule_id else None,
                      i.created if i.terminal else None) for i in stored])
            self._add_records(conn, records)
            self._count_caught(conn, items)

        await self._submit(op)
        for i in retained:
            self._retained(i.created, size)
        self._index_stored(stored)

    def _count_caught(self, conn: sqlite3.Connection, items: Iterable[Inbound]) -> None:
        """Count, per rule and queue, the received messages a bounce rule caught."""
        by_rule: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for i in items:
            if i.terminal and i.rule_id:
                by_rule[i.rule_id][str(i.queue)] += 1
        for rule_id, per_queue in by_rule.items():
            self._count_rule(conn, rule_id, per_queue)

    def _index_stored(self, stored: Iterable[Inbound]) -> None:
        """The queue index after received messages were committed (retained
        ones are known, not counted)."""
        for i in stored:
            name = self.index.learn(i.queue)
            if not i.terminal:
                self.index.add(name)
            if i.held:
                self.index.hold([name])

    # -- the scheduled -> ready -> done path -------------------------------

    async def claim_due(self, now: float, limit: int) -> list[Stored]:
        """Claim up to ``limit`` due messages; their ids are in hand from the
        same step on (so a sweep never takes one for an orphan)."""
        if limit <= 0:
            return []
        in_hand = self.in_hand

        def op(conn: sqlite3.Connection) -> list[Stored]:
            rows = conn.execute(
                "UPDATE messages SET state = 1 WHERE id IN (SELECT id FROM messages"
                f" WHERE state = 0 AND due <= ? ORDER BY due LIMIT ?) RETURNING {_COLS}",
                (now, limit)).fetchall()
            in_hand.update(r[0] for r in rows)
            return [_row(r) for r in rows]

        return await self._submit(op)

    async def adopt_orphans(self) -> list[Stored]:
        """Claimed messages that are not in hand (their delivery was lost):
        they are taken in hand and returned, to be given a fate."""
        in_hand = self.in_hand

        def op(conn: sqlite3.Connection) -> list[Stored]:
            rows = [r for r in conn.execute(f"SELECT {_COLS} FROM messages WHERE state = 1")
                    if r[0] not in in_hand]
            in_hand.update(r[0] for r in rows)
            return [_row(r) for r in rows]

        return await self._submit(op)

    def let_go(self, ids: Iterable[str]) -> None:
        """The holder of these claimed messages no longer has them; a message
        still claimed in the spool after this is an orphan."""
        self.in_hand.difference_update(ids)

    async def finish(self, msg: Stored, records: list[bytes], rule_id: str | None = None) -> bool:
        """Take a claimed message out of its queue for good, with its terminal
        record; one that bounce rule ``rule_id`` bounced is retained (if
        ``retain``), else removed."""
        retain = self.retain and rule_id is not None
        now = time.time()

        def op(conn: sqlite3.Connection) -> bool:
            if retain:
                gone = conn.execute("UPDATE messages SET state = 3, rule_key = ?, bounced_at = ?"
                                    " WHERE id = ? AND state = 1",
                                    (self._rule_key(conn, rule_id), now, msg.id)).rowcount
            else:
                gone = conn.execute("DELETE FROM messages WHERE id = ? AND state = 1",
                                    (msg.id,)).rowcount
            if gone:
                self._add_records(conn, records)
                if rule_id:
                    self._count_rule(conn, rule_id, {msg.queue: 1})
            return bool(gone)

        try:
            done = await self._submit(op)
        finally:
            self.in_hand.discard(msg.id)
        if done:
            self.index.remove(msg.queue)
            if retain:
                self._retained(now, msg.size)
        return done

    async def retry(self, msg: Stored, due: float, records: list[bytes],
                    held: bool = False) -> bool:
        """Back into its scheduled queue (held: on hold), with its records."""
        def op(conn: sqlite3.Connection) -> bool:
            n = conn.execute(
                "UPDATE messages SET state = ?, due = ?, attempts = ? WHERE id = ? AND state = 1",
                (HELD if held else SCHEDULED, due, msg.attempts, msg.id)).rowcount
            if n:
                self._add_records(conn, records)
            return bool(n)

        try:
            done = await self._submit(op)
        finally:
            self.in_hand.discard(msg.id)
        if done and held:
            self.index.hold([msg.queue])
        return done

    async def release(self, msgs: Collection[Stored], held: bool = False) -> None:
        ids = [m.id for m in msgs]
        if not ids:
            return
        state = HELD if held else SCHEDULED

        def op(conn: sqlite3.Connection) -> int:
            return conn.executemany("UPDATE messages SET state = ? WHERE id = ? AND state = 1",
                                    [(state, i) for i in ids]).rowcount

        try:
            await self._submit(op)
        finally:
            self.let_go(ids)
        if held:
            self.index.hold({m.queue for m in msgs})

    async def hold(self, queues: Collection[str]) -> None:
        """Take the scheduled messages of ``queues`` out of promotion."""
        await self._set_queue_state(queues, SCHEDULED, HELD)
        self.index.hold(queues)

    async def unhold(self, queues: Collection[str]) -> None:
        """Give held messages of ``queues`` back to their scheduled queues."""
        await self._set_queue_state(queues, HELD, SCHEDULED)
        self.index.unhold(queues)

    async def _set_queue_state(self, queues: Collection[str], old: int, new: int) -> None:
        names = list(queues)
        if names:
            await self._submit(lambda c: c.executemany(
                "UPDATE messages SET state = ? WHERE queue = ? AND state = ?",
                [(new, q, old) for q in names]))

    async def sweep(self, queues: Collection[str], limit: int, pack: PackFn, rule_id: str,
                    where: MessageFilter | None = None) -> Swept:
        """Remove up to ``limit`` messages of ``queues`` that ``where`` selects,
        queue by queue (each queue's rows are contiguous: see
        ``new_message_id``): scheduled, held, and claimed ones that are not in
        hand (orphans). Those in hand are on their way to a destination,
        where the rule's fence stops them."""
        names = list(queues)
        in_hand = self.in_hand
        clause, params = _where(where)
        retain = self.retain  # kept for a restore
        take = ("UPDATE messages SET state = 3, rule_key = ?, bounced_at = ?" if retain
                else "DELETE FROM messages")
        now = time.time()

        def op(conn: sqlite3.Connection) -> Swept:
            removed: dict[str, int] = defaultdict(int)
            exhausted: list[str] = []
            gone: list[Stored] = []
            for name in names:
                want = limit - len(gone)
                if want <= 0:
                    break
                took = (self._rule_key(conn, rule_id), now) if retain else ()
                rows = conn.execute(
                    f"{take} WHERE id IN (SELECT id FROM messages"
                    f" WHERE queue = ? AND state IN (0, 2){clause} LIMIT ?)"
                    f" RETURNING {_COLS}", (*took, name, *params, want)).fetchall()
                if len(rows) < want:
                    orphans = [i for (i,) in conn.execute(
                        f"SELECT id FROM messages WHERE queue = ? AND state = 1{clause}",
                        (name, *params)) if i not in in_hand][:want - len(rows)]
                    for i in orphans:
                        rows += conn.execute(f"{take} WHERE id = ? RETURNING {_COLS}",
                                             (*took, i)).fetchall()
                    if len(rows) < want:
                        exhausted.append(name)
                gone += map(_row, rows)
                if rows:
                    removed[name] = len(rows)
            packed = pack(gone) if gone else None
            if packed is not None:
                self._add_records(conn, [packed])
            self._count_rule(conn, rule_id, removed)
            return Swept(dict(removed), exhausted, sum(m.size for m in gone))

        self._last_sweep = time.monotonic()
        swept = await self._submit(op)
        for name, n in swept.removed.items():
            self.index.remove(name, n)
        if retain and swept.bytes:
            self._retained(now, swept.bytes)
        return swept

    async def count_matching(self, queues: Collection[str], where: MessageFilter | None,
                             samples: int = 10, states: tuple[int, ...] = (0, 1, 2),
                             ) -> tuple[dict[str, int], list[Stored]]:
        """How many messages of ``queues`` in ``states`` (default: all queued)
        ``where`` selects, per queue, and up to ``samples`` of them (reads only)."""
        names = list(queues)
        clause, params = _where(where)
        in_states = f"state IN ({', '.join(str(int(x)) for x in states)})"

        def read(conn: sqlite3.Connection) -> tuple[dict[str, int], list[Stored]]:
            counts: dict[str, int] = {}
            found: list[Stored] = []
            for name in names:
                (n,) = conn.execute(f"SELECT count(*) FROM messages WHERE queue = ?"
                                    f" AND {in_states}{clause}", (name, *params)).fetchone()
                if n:
                    counts[name] = n
                    if len(found) < samples:
                        found += map(_row, conn.execute(
                            f"SELECT {_COLS} FROM messages WHERE queue = ? AND {in_states}"
                            f"{clause} LIMIT ?", (name, *params, samples - len(found))))
            return counts, found

        return await self._read(read)

    async def restore(self, rule_id: str, limit: int, pack: PackFn) -> dict[str, int]:
        """Put up to ``limit`` messages that bounce rule ``rule_id`` retained
        back into their queues (created time, attempts and due time as they
        were), each with the record ``pack`` makes, in one commit; per-queue
        counts (empty: nothing left to restore)."""

        def op(conn: sqlite3.Connection) -> tuple[dict[str, int], int]:
            key = self._rule_key(conn, rule_id)
            rows: list[tuple] = []
            for (queue,) in conn.execute("SELECT queue FROM rule_counts WHERE rule_id = ?",
                                         (rule_id,)).fetchall():
                if len(rows) >= limit or key is None:
                    break
                rows += conn.execute(
                    "UPDATE messages SET state = 0, rule_key = NULL, bounced_at = NULL"
                    " WHERE id IN (SELECT id FROM messages WHERE queue = ? AND state = 3"
                    f" AND rule_key = ? LIMIT ?) RETURNING {_COLS}",
                    (queue, key, limit - len(rows))).fetchall()
            msgs = [_row(r) for r in rows]
            per_queue: dict[str, int] = defaultdict(int)
            for m in msgs:
                per_queue[m.queue] += 1
            packed = pack(msgs) if msgs else None
            if packed is not None:
                self._add_records(conn, [packed])
            conn.executemany(
                "INSERT INTO rule_restores(rule_id, queue, n) VALUES (?, ?, ?) "
                "ON CONFLICT(rule_id, queue) DO UPDATE SET n = n + excluded.n",
                [(rule_id, q, n) for q, n in per_queue.items()])
            return dict(per_queue), sum(m.size for m in msgs)

        restored, size = await self._submit(op)
        self.retained_bytes -= size
        for name, n in restored.items():
            self.index.add(name, n)
        return restored

    async def drop_retained(self, before: float, max_bytes: int, limit: int = 5000) -> int:
        """Drop up to ``limit`` retained messages: those bounced before
        ``before``, then the oldest while more than ``max_bytes`` are kept.
        Nothing is read unless something is due to go."""
        oldest = self._oldest_retained
        if (oldest is None or oldest >= before) and self.retained_bytes <= max_bytes:
            return 0
        # found on the reader's connection (a scan), dropped by the writer
        rows = await self._read(lambda c: c.execute(
            "SELECT bounced_at, id, size FROM messages WHERE state = 3 ORDER BY bounced_at"
            " LIMIT ?", (limit + 1,)).fetchall())
        gone, dropped, over = [], 0, self.retained_bytes - max_bytes
        for at, mid, size in rows[:limit]:
            if at >= before and over <= 0:
                break
            gone.append((mid,))
            dropped += size
            over -= size
        next_oldest = rows[len(gone)][0] if len(gone) < len(rows) else None

        def op(conn: sqlite3.Connection) -> int:
            return conn.executemany("DELETE FROM messages WHERE id = ? AND state = 3",
                                    gone).rowcount

        await self._submit(op)
        self.retained_bytes -= dropped
        self._oldest_retained = next_oldest
        return len(gone)

    async def collect_bodies(self, limit: int = 1000) -> int:
        """Release the bodies of up to ``limit`` removed messages; returns how many."""

        def op(conn: sqlite3.Connection) -> int:
            rows = conn.execute("SELECT rowid, body_id FROM garbage ORDER BY rowid LIMIT ?",
                                (limit,)).fetchall()
            if not rows:
                return 0
            refs: dict[int, int] = defaultdict(int)
            for _, body_id in rows:
                refs[body_id] += 1
            conn.executemany("UPDATE bodies SET refs = refs - ? WHERE id = ?",
                             [(n, b) for b, n in refs.items()])
            conn.executemany("DELETE FROM bodies WHERE id = ? AND refs <= 0",
                             [(b,) for b in refs])
            conn.execute("DELETE FROM garbage WHERE rowid <= ?", (rows[-1][0],))
            return len(rows)

        return await self._submit(op)

    async def _collect_loop(self) -> None:
        """Release garbage bodies a little at a time, so no writer batch waits long,
        and not while a bounce sweep runs (it comes first)."""
        while True:
            if time.monotonic() - self._last_sweep < 2.0:
                await asyncio.sleep(0.5)
                continue
            try:
                n = await self.collect_bodies()
            except SpoolClosed:
                return
            await asyncio.sleep(0.1 if n else 1.0)

    async def add_records(self, records: list[bytes]) -> None:
        """Commit log records that go with no state change (e.g. Rejection)."""
        await self._submit(lambda c: self._add_records(c, records))

    # -- reads -------------------------------------------------------------

    async def load_body(self, body_id: int) -> bytes:
        return await self._reader.load_body(body_id)

    async def get_message(self, msg_id: str) -> Stored | None:
        row = await self._read(lambda c: c.execute(
            f"SELECT {_COLS} FROM messages WHERE id = ?", (msg_id,)).fetchone())
        return _row(row) if row else None

    def size_bytes(self) -> int:
        """Bytes on disk: the database and its write-ahead log."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += Path(str(self.path) + suffix).stat().st_size
            except OSError:
                pass
        return total

    # -- rules -------------------------------------------------------------

    async def save_rule(self, rule: dict[str, Any], replaces: Collection[str] = (),
                        audit: bytes | None = None) -> None:
        """Store ``rule``; the rules it replaces end, in the same commit."""
        old = list(replaces)

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany("UPDATE rules SET ended = ? WHERE id = ? AND ended IS NULL",
                             [(rule["created"], rid) for rid in old])
            conn.execute(
                "INSERT INTO rules(id, kind, criteria, reason, created, expires, suppress_logging,"
                " grace_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (rule["id"], rule["kind"], orjson.dumps(rule["criteria"]).decode(), rule["reason"],
                 rule["created"], rule["expires"], int(rule.get("suppress_logging", False)),
                 rule.get("grace_until", 0.0)))
            self._add_audit(conn, audit)

        await self._submit(op)

    async def end_rules(self, ids: Collection[str], when: float,
                        audit: bytes | None = None) -> None:
        """The rules end (cancelled, expired); kept for restores until forgotten."""
        ids = list(ids)

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany("UPDATE rules SET ended = ? WHERE id = ? AND ended IS NULL",
                             [(when, rid) for rid in ids])
            self._add_audit(conn, audit)

        await self._submit(op)

    async def set_grace(self, rule_id: str, until: float, audit: bytes | None = None) -> None:
        """Move a rule's end of grace (applying it: to now)."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE rules SET grace_until = ? WHERE id = ?", (until, rule_id))
            self._add_audit(conn, audit)

        await self._submit(op)

    async def set_expiry(self, rule_id: str, expires: float, audit: bytes | None = None) -> None:
        """Move an active rule's end (an automatic rule triggered again)."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE rules SET expires = ? WHERE id = ? AND ended IS NULL",
                         (expires, rule_id))
            self._add_audit(conn, audit)

        await self._submit(op)

    async def forget_rules(self, ended_before: float) -> int:
        """Remove rules that ended before ``ended_before``, with their counts."""

        def op(conn: sqlite3.Connection) -> int:
            ids = [r for (r,) in conn.execute("SELECT id FROM rules WHERE ended < ?",
                                             (ended_before,))]
            for table, column in (("rule_counts", "rule_id"), ("rule_restores", "rule_id"),
                                  ("rules", "id")):
                conn.executemany(f"DELETE FROM {table} WHERE {column} = ?", [(r,) for r in ids])
            for r in ids:
                self._rule_keys.pop(r, None)
            return len(ids)

        return await self._submit(op)

    @staticmethod
    def _rule_rows(conn: sqlite3.Connection, where: str, params: tuple) -> list[dict[str, Any]]:
        rows = conn.execute(
            "SELECT id, kind, criteria, reason, created, expires, suppress_logging, grace_until,"
            f" ended FROM rules WHERE {where}", params).fetchall()
        out = []
        for rid, kind, crit, reason, created, expires, sup, grace, ended in rows:
            counts = dict(conn.execute("SELECT queue, n FROM rule_counts WHERE rule_id = ?",
                                       (rid,)).fetchall())
            restored = dict(conn.execute("SELECT queue, n FROM rule_restores WHERE rule_id = ?",
                                         (rid,)).fetchall())
            out.append({"id": rid, "kind": kind, "criteria": orjson.loads(crit), "reason": reason,
                        "created": created, "expires": expires, "suppress_logging": bool(sup),
                        "grace_until": grace, "ended": ended, "bounced": counts,
                        "restored": restored})
        return out

    async def load_rules(self) -> list[dict[str, Any]]:
        """The rules that have not ended (those past their expiry included)."""
        return await self._read(lambda c: self._rule_rows(c, "ended IS NULL", ()))

    async def get_rule(self, rule_id: str) -> dict[str, Any] | None:
        """A rule, in force or ended (``ended`` says when), with its counts."""
        rows = await self._read(lambda c: self._rule_rows(c, "id = ?", (rule_id,)))
        return rows[0] if rows else None

    async def retained_count(self, rule_id: str) -> int:
        """How many messages bounce rule ``rule_id`` bounced are retained now."""
        def read(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT rowid FROM rules WHERE id = ?", (rule_id,)).fetchone()
            if row is None:
                return 0
            return sum(conn.execute(
                "SELECT count(*) FROM messages WHERE queue = ? AND state = 3 AND rule_key = ?",
                (queue, row[0])).fetchone()[0] for (queue,) in conn.execute(
                "SELECT queue FROM rule_counts WHERE rule_id = ?", (rule_id,)).fetchall())

        return await self._read(read)
