"""Log records (KumoMTA's field names) and the JSONL writer.

Records are never written to files directly by the code that causes them:
they are inserted into the spool's ``outbox`` table in the same transaction
as the state change they describe (docs/ARCHITECTURE.md, "Records follow
state"). ``LogWriter`` drains
the outbox to ``<data_dir>/logs/YYYYMMDD.jsonl``, fsyncs, and only then
deletes the drained rows, so a crash can at worst repeat a record.
"""

from __future__ import annotations

import datetime as dt
import functools
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

RECEPTION = "Reception"
DELIVERY = "Delivery"
TRANSIENT_FAILURE = "TransientFailure"
BOUNCE = "Bounce"
EXPIRATION = "Expiration"
ADMIN_BOUNCE = "AdminBounce"
REJECTION = "Rejection"
ADMIN_RESTORE = "AdminRestore"  # Sluice's own: a restore undid an AdminBounce
ADMIN_REBIND = "AdminRebind"    # an xfer moved the message to another node (or gave it back)

TERMINAL_TYPES = frozenset({DELIVERY, BOUNCE, EXPIRATION, ADMIN_BOUNCE})


@dataclass(slots=True, frozen=True)
class Response:
    """An SMTP response as logged: code, enhanced code, text, command.

    ``command`` is the command the response answers; the reply to the end of
    the message data is ``"."`` (as KumoMTA logs it).
    """

    code: int
    content: str
    enhanced: tuple[int, int, int] | None = None
    command: str | None = None

    def as_dict(self) -> dict[str, Any]:
        enhanced = None
        if self.enhanced is not None:
            c, s, d = self.enhanced
            enhanced = {"class": c, "subject": s, "detail": d}
        return {"code": self.code, "enhanced_code": enhanced,
                "content": self.content, "command": self.command}

    @property
    def text(self) -> str:
        if self.enhanced:
            return f"{self.code} {'.'.join(map(str, self.enhanced))} {self.content}"
        return f"{self.code} {self.content}"


@dataclass(slots=True, frozen=True)
class Tls:
    """The TLS of a session, as logged (only when the session used TLS)."""

    cipher: str
    protocol_version: str
    peer_subject_name: tuple[str, ...] | None = None

    @classmethod
    def of(cls, ssl_object: Any, peer_subject_name: tuple[str, ...] | None = None) -> Tls | None:
        """The TLS of a session from its ``ssl.SSLObject`` (None: plain text)."""
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        return cls(cipher[0] if cipher else "", ssl_object.version() or "", peer_subject_name)

    def to_wire(self) -> list:
        return [self.cipher, self.protocol_version,
                list(self.peer_subject_name) if self.peer_subject_name is not None else None]

    @classmethod
    def from_wire(cls, data: list | None) -> Tls | None:
        if data is None:
            return None
        cipher, version, subject = data
        return cls(cipher, version, tuple(subject) if subject is not None else None)


@dataclass(slots=True, frozen=True)
class Attempt:
    """Where a delivery attempt went: the site, the peer, the outbound
    session (one UUID per connection) and its TLS, if any."""

    site: str = ""
    peer: tuple[str, str] | None = None
    session_id: str | None = None
    tls: Tls | None = None

    def to_wire(self) -> list:
        return [self.site, list(self.peer) if self.peer else None, self.session_id,
                self.tls.to_wire() if self.tls else None]

    @classmethod
    def from_wire(cls, data: list) -> Attempt:
        site, peer, session_id, tls = data
        return cls(site, tuple(peer) if peer else None, session_id, Tls.from_wire(tls))


NO_ATTEMPT = Attempt()


def parse_enhanced(text: str) -> tuple[tuple[int, int, int] | None, str]:
    """Split a leading ``x.y.z`` enhanced status code off a response text."""
    head, _, rest = text.partition(" ")
    parts = head.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] in "245":
        return (int(parts[0]), int(parts[1]), int(parts[2])), rest
    return None, text


def internal_error(exc: BaseException, where: str) -> Response:
    """The response logged when an unexpected exception ends an attempt: a
    transient failure, so the message is tried again."""
    text = f"internal error during {where}: {type(exc).__name__}: {exc}"
    return Response(451, text.replace("\r", " ").replace("\n", " "), (4, 3, 0))


@functools.lru_cache(maxsize=8)
def _second(whole: int) -> str:
    # Records come in bursts within the same second: format each second once.
    return dt.datetime.fromtimestamp(whole, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def _rfc3339(ts: float) -> str:
    whole = int(ts)
    return f"{_second(whole)}.{int((ts - whole) * 1_000_000):06d}Z"


def rfc3339(ts: float) -> str:
    """Unix seconds as an RFC 3339 UTC time (``2026-11-27T08:00:00.123456Z``)."""
    return _rfc3339(ts)


# KumoMTA's classification when no classifier rule matched; Sluice has no
# classifier, so every record carries it.
UNCATEGORIZED = "Uncategorized"


def make_record(
    kind: str,
    *,
    msg_id: str,
    sender: str,
    recipient: str,
    queue: str,
    meta: dict[str, str],
    size: int,
    created: float,
    num_attempts: int,
    nodeid: str,
    response: Response,
    site: str = "",
    peer: tuple[str, str] | None = None,
    reception_protocol: str | None = None,
    delivery_protocol: str | None = None,
    session_id: str | None = None,
    tls: Tls | None = None,
    now: float | None = None,
) -> bytes:
    """One log record, serialized (one JSON object, no trailing newline).

    The fields and their types are KumoMTA's ``JsonLogRecord``; ``peer`` is
    (name, IP address). The TLS fields are present only when ``tls`` is.
    """
    ts = time.time() if now is None else now
    rec = {
        "type": kind,
        "id": msg_id,
        "sender": sender,
        "recipient": recipient,
        "queue": queue,
        "site": site,
        "size": size,
        "response": response.as_dict(),
        "peer_address": {"name": peer[0], "addr": peer[1]} if peer else None,
        "timestamp": int(ts),
        "event_time": _rfc3339(ts),
        "created": int(created),
        "created_time": _rfc3339(created),
        "num_attempts": num_attempts,
        "bounce_classification": UNCATEGORIZED,
        "meta": meta,
        "headers": {},
        "delivery_protocol": delivery_protocol,
        "reception_protocol": reception_protocol,
        "nodeid": nodeid,
        "session_id": session_id,
    }
    if tls is not None:
        rec["tls_cipher"] = tls.cipher
        rec["tls_protocol_version"] = tls.protocol_version
        if tls.peer_subject_name is not None:
            rec["tls_peer_subject_name"] = list(tls.peer_subject_name)
    return orjson.dumps(rec)


class _StoredMessage(Protocol):
    id: str
    sender: str
    recipient: str
    queue: str
    size: int
    created: float
    attempts: int
    protocol: str | None


_DELIVERY_KINDS = frozenset({DELIVERY, BOUNCE, TRANSIENT_FAILURE})


def message_record(kind: str, msg: _StoredMessage, response: Response, *,
                   meta: dict[str, str], nodeid: str, attempt: Attempt = NO_ATTEMPT) -> bytes:
    """The record of an event in the life of a stored message (``spool.Stored``)."""
    return make_record(kind, msg_id=msg.id, sender=msg.sender, recipient=msg.recipient,
                       queue=msg.queue, meta=meta, size=msg.size, created=msg.created,
                       num_attempts=msg.attempts, nodeid=nodeid, response=response,
                       site=attempt.site, peer=attempt.peer, reception_protocol=msg.protocol,
                       delivery_protocol="ESMTP" if kind in _DELIVERY_KINDS else None,
                       session_id=attempt.session_id, tls=attempt.tls)


# An outbox row that starts with this is an audit entry: the log writer
# appends it to logs/audit.jsonl instead of the day's record file.
AUDIT = b"\x00AUD"


# An outbox row that starts with this holds a packed batch of records of one
# kind (a bounce sweep's chunk of AdminBounce records): the shared parts
# once (kind, response, node, time), the per-message fields as a list. The
# log writer expands it with ``make_record``; expansion is deterministic, so
# a batch written twice after a crash repeats its records identically.
PACKED = b"\x00PK1"
_PACKED_AB1 = b"\x00AB1"  # AdminBounce batches of older versions (rows without protocol)

# A packed row: (id, sender, recipient, queue, size, created, attempts, reception_protocol)
PackedRow = tuple[str, str, str, str, int, float, int, "str | None"]


def pack_records(kind: str, response: Response, nodeid: str,
                 meta: dict[str, dict[str, str]], rows: list[PackedRow]) -> bytes:
    """One outbox entry for records of ``kind`` that differ only in ``rows``
    (``meta`` per queue name)."""
    return PACKED + orjson.dumps({"kind": kind, "response": response.as_dict(), "nodeid": nodeid,
                                  "now": time.time(), "meta": meta, "rows": rows})


def _response_from_dict(d: dict[str, Any]) -> Response:
    e = d["enhanced_code"]
    return Response(d["code"], d["content"],
                    (e["class"], e["subject"], e["detail"]) if e else None, d["command"])


def expand(entry: bytes) -> bytes:
    """The JSON lines an outbox row stands for (packed or not)."""
    if entry.startswith(PACKED):
        batch = orjson.loads(entry[len(PACKED):])
        kind, response, rows = batch["kind"], _response_from_dict(batch["response"]), batch["rows"]
    elif entry.startswith(_PACKED_AB1):
        batch = orjson.loads(entry[len(_PACKED_AB1):])
        kind, rows = ADMIN_BOUNCE, [[*r, None] for r in batch["rows"]]
        response = Response(551, f"Administrator bounced with reason: {batch['reason']}",
                            (5, 7, 1))
    else:
        return entry
    meta, nodeid, now = batch["meta"], batch["nodeid"], batch["now"]
    fill = _template(kind, response, nodeid, now)
    if fill is None:
        return b"\n".join(
            make_record(kind, msg_id=i, sender=sender, recipient=rcpt, queue=queue,
                        meta=meta.get(queue, {}), size=size, created=created,
                        num_attempts=attempts, nodeid=nodeid, response=response,
                        reception_protocol=proto, now=now)
            for i, sender, rcpt, queue, size, created, attempts, proto in rows)
    # Per-queue and per-second parts are serialized once per batch.
    queues: dict[str, tuple[bytes, bytes]] = {}
    seconds: dict[int, bytes] = {}
    protos: dict[str | None, bytes] = {}
    dumps = orjson.dumps
    out = []
    for i, sender, rcpt, queue, size, created, attempts, proto in rows:
        q = queues.get(queue)
        if q is None:
            q = queues[queue] = (dumps(queue), dumps(meta.get(queue, {})))
        whole = int(created)
        sec = seconds.get(whole)
        if sec is None:
            sec = seconds[whole] = _second(whole).encode()
        p = protos.get(proto)
        if p is None:
            p = protos[proto] = dumps(proto)
        out.append(fill((dumps(i), dumps(sender), dumps(rcpt), q[0], size, whole, attempts, q[1],
                         sec, p, int((created - whole) * 1_000_000))))
    return b"\n".join(out)


# Values that stand for a record's per-message fields in a template record,
# in the order ``fill`` takes them (see ``_template``). ``created_time`` takes
# two fields, its whole second (formatted) and its microseconds.
_MARKS: tuple[Any, ...] = ("\x00id\x00", "\x00sender\x00", "\x00rcpt\x00", "\x00queue\x00",
                           -9007199254740001, -9007199254740002, -9007199254740003,
                           {"\x00meta\x00": ""}, "\x00ctime\x00", "\x00proto\x00")
_CTIME = 8
_CTIME_SLOT = b'"%s.%06dZ"'


def _template(kind: str, response: Response, nodeid: str,
              now: float) -> Callable[[tuple], bytes] | None:
    """A fast way to serialize the records of one packed batch, which differ
    only in the per-message fields.

    ``make_record`` serializes one record with markers in those fields; the
    markers become ``%s``/``%d`` slots of a bytes format. ``fill`` takes the
    fields in ``_MARKS`` order (strings and meta already serialized, numbers
    as ints) and gives, byte for byte, what ``make_record`` gives. None if a
    marker is not found exactly once (a reason that contains one): then
    ``make_record`` it is, record by record.
    """
    mid, msender, mrcpt, mqueue, msize, mcreated, mattempts, mmeta, mctime, mproto = _MARKS
    sample = make_record(kind, msg_id=mid, sender=msender, recipient=mrcpt, queue=mqueue,
                         meta=mmeta, size=msize, created=0, num_attempts=mattempts,
                         nodeid=nodeid, response=response, reception_protocol=mproto, now=now)
    # created and created_time are two views of one number: mark them apart.
    rec = orjson.loads(sample)
    rec["created"], rec["created_time"] = mcreated, mctime
    sample = orjson.dumps(rec)
    found = []
    for k, value in enumerate(_MARKS):
        mark = b"%d" % value if isinstance(value, int) else orjson.dumps(value)
        if sample.count(mark) != 1:
            return None
        slot = _CTIME_SLOT if k == _CTIME else b"%d" if isinstance(value, int) else b"%s"
        found.append((sample.index(mark), len(mark), k, slot))
    found.sort()
    fmt, at, keys = [], 0, []
    for pos, length, k, slot in found:
        fmt += [sample[at:pos].replace(b"%", b"%%"), slot]
        at = pos + length
        keys += [k, len(_MARKS)] if k == _CTIME else [k]  # the microseconds come last
    fmt.append(sample[at:].replace(b"%", b"%%"))
    template = b"".join(fmt)
    order = operator.itemgetter(*keys)
    return lambda fields: template % order(fields)


class LogWriter(threading.Thread):
    """Drains the spool's outbox to JSONL files, oldest record first.

    ``delete_upto`` is how drained rows are removed: through the spool's
    single writer, so this thread never writes to the database itself.
    """

    MAX_ROWS = 5000
    MAX_BYTES = 8 << 20

    def __init__(self, db_path: Path, log_dir: Path,
                 delete_upto: Callable[[int], None]) -> None:
        super().__init__(name="sluice-logwriter", daemon=True)
        self._db_path = db_path
        self._log_dir = log_dir
        self._delete_upto = delete_upto
        self._wake = threading.Event()
        self._stopping = False
        self._last_seq = 0
        self._last_delete = 0.0

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Drain what is committed, then end the thread."""
        self._stopping = True
        self._wake.set()
        self.join()

    def _path(self) -> Path:
        return self._log_dir / (dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d") + ".jsonl")

    def _repair_tails(self) -> None:
        """Cut a record that a crash left half-written at the end of a file.

        Its row is still in the outbox (rows are deleted only after the
        write), so it is written again, whole, by the first drain.
        """
        for path in self._log_dir.glob("*.jsonl"):
            with open(path, "r+b") as fh:
                size = fh.seek(0, os.SEEK_END)
                if size == 0:
                    continue
                fh.seek(max(0, size - 65536))
                tail = fh.read()
                if tail.endswith(b"\n"):
                    continue
                cut = tail.rfind(b"\n")
                keep = size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= 65536 else size)
                fh.truncate(keep)
                os.fsync(fh.fileno())

    def run(self) -> None:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self._repair_tails()
        conn = sqlite3.connect(self._db_path, check_same_thread=False)
        try:
            while True:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                while self._drain_once(conn):
                    pass
                if self._stopping:
                    self._delete_upto(self._last_seq)  # what was written, before the writer stops
                    return
        finally:
            conn.close()

    def _drain_once(self, conn: sqlite3.Connection) -> bool:
        chunks: list[bytes] = []
        audit: list[bytes] = []
        size = 0
        last = self._last_seq
        full = False
        for seq, record in conn.execute("SELECT seq, record FROM outbox WHERE seq > ? ORDER BY seq",
                                        (self._last_seq,)):
            if record.startswith(AUDIT):
                audit.append(record[len(AUDIT):])
            else:
                chunks.append(expand(record))
                size += len(chunks[-1])
            last = seq
            if len(chunks) + len(audit) >= self.MAX_ROWS or size >= self.MAX_BYTES:
                full = True
                break
        if last == self._last_seq:
            return False
        for path, lines in ((self._path(), chunks), (self._log_dir / "audit.jsonl", audit)):
            if lines:
                with open(path, "ab") as fh:
                    fh.write(b"\n".join(lines) + b"\n")
                    fh.flush()
                    os.fsync(fh.fileno())
        self._last_seq = last
        # Drained rows are deleted at most once a second: fewer write
        # transactions to compete with reception (in other processes too).
        now = time.monotonic()
        if full or self._stopping or now - self._last_delete >= 1.0:
            self._delete_upto(last)
            self._last_delete = now
        return full
