"""The storage interface the rest of Sluice talks to.

Everything that changes a message's fate goes through one of these calls, and
each call that writes a log record commits it together with the change.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..message import QueueName
from .index import QueueIndex


def new_message_id(queue: str) -> str:
    """32 hex digits: a 32-bit hash of the queue name, a 48-bit ms clock, 48 random bits.

    The spool keeps messages in id order, so this keeps each queue's
    messages together on disk, oldest first: sweeping a queue (a bounce)
    rewrites a few contiguous pages instead of one page per message.
    """
    prefix = hashlib.blake2b(queue.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()
    return f"{prefix}{int(time.time() * 1000):012x}{os.urandom(6).hex()}"


@dataclass(slots=True)
class Inbound:
    """A message being received, with the records its reception writes.

    ``terminal`` set means the message is not queued at all (an active bounce
    rule caught it at reception); ``rule_id`` then names that rule. ``held``
    means its queue is suspended.
    """

    id: str
    queue: QueueName
    sender: str
    recipient: str
    created: float
    protocol: str | None = None  # how it was received (ESMTP, SMTP, HTTP)
    records: list[bytes] = field(default_factory=list)
    terminal: bool = False
    rule_id: str | None = None
    held: bool = False
    # A message another node transferred (xfer): its due time and attempts
    # as they were there, and which of the batch's bodies is its own.
    due: float | None = None
    attempts: int = 0
    body: int = 0


@dataclass(slots=True)
class Stored:
    """A message row as read from the spool."""

    id: str
    queue: str
    sender: str
    recipient: str
    body_id: int
    size: int
    created: float
    due: float
    attempts: int
    protocol: str | None = None  # how it was received: the records' reception_protocol


# A ``Stored``'s columns in the messages table, in its fields' order: ``Stored(*row)``.
STORED_COLUMNS = "id, queue, sender, recipient, body_id, size, created, due, attempts, protocol"


@dataclass(frozen=True, slots=True)
class MessageFilter:
    """Per-message criteria as the spool applies them to rows: glob patterns
    on the sender and recipient (``message.glob_match``), and a creation time
    to be before. None: any."""

    sender: str | None = None
    recipient: str | None = None
    created_before: float | None = None


# Makes the outbox entry for a chunk of admin-bounced messages (None: no records).
PackFn = Callable[[list[Stored]], bytes | None]


class Spool(Protocol):
    """What a message store must offer. ``SqliteSpool`` is the embedded one.

    ``index`` is the queue index (read-only to callers); ``in_hand`` the
    claimed messages this process is delivering (see ``SqliteSpool``).
    """

    index: QueueIndex
    in_hand: set[str]

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def receive(self, body: bytes, items: list[Inbound]) -> None:
        """Store the body once and every non-terminal item; commit with fsync."""

    async def claim_due(self, now: float, limit: int) -> list[Stored]:
        """Mark up to ``limit`` due, not held messages as being delivered; return them."""

    async def adopt_orphans(self) -> list[Stored]:
        """Claimed messages not in hand: taken in hand and returned."""

    def let_go(self, ids: Iterable[str]) -> None:
        """These claimed messages are no longer in hand."""

    async def finish(self, msg: Stored, records: list[bytes], rule_id: str | None = None) -> bool:
        """Remove a claimed message for good, writing its terminal record."""

    async def retry(self, msg: Stored, due: float, records: list[bytes]) -> bool:
        """Put a claimed message back into its scheduled queue."""

    async def release(self, msgs: Collection[Stored], held: bool = False) -> None:
        """Put claimed messages back (held, or scheduled as due) without any record."""

    async def hold(self, queues: Collection[str]) -> None:
        """Suspend: keep the messages of ``queues`` out of promotion."""

    async def unhold(self, queues: Collection[str]) -> None:
        """End a suspension of ``queues``."""

    async def sweep(self, queues: Collection[str], limit: int, pack: PackFn,
                    rule_id: str) -> dict[str, int]:
        """Remove up to ``limit`` messages of ``queues`` that are not in hand;
        per-queue counts."""

    async def collect_bodies(self, limit: int = 1000) -> int:
        """Release the bodies of removed messages; returns how many were looked at."""

    async def add_records(self, records: list[bytes]) -> None:
        """Commit log records that go with no state change."""

    async def load_body(self, body_id: int) -> bytes: ...
    async def get_message(self, msg_id: str) -> Stored | None: ...

    async def save_rule(self, rule: dict[str, Any], replaces: Collection[str] = (),
                        audit: bytes | None = None) -> None: ...
    async def end_rules(self, ids: Collection[str], when: float,
                        audit: bytes | None = None) -> None: ...
    async def set_grace(self, rule_id: str, until: float, audit: bytes | None = None) -> None: ...
    async def set_expiry(self, rule_id: str, expires: float,
                         audit: bytes | None = None) -> None: ...
    async def forget_rules(self, ended_before: float) -> int: ...
    async def load_rules(self) -> list[dict[str, Any]]: ...
    async def get_rule(self, rule_id: str) -> dict[str, Any] | None: ...
    async def add_audit(self, entry: bytes) -> None: ...
    async def list_audit(self, since: float | None, limit: int) -> list[bytes]: ...
