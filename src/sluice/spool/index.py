"""The queue index: how many messages each scheduled queue holds, what its
name is made of, and which queues are held (suspended).

Memory holds one entry per queue, never one per message (see
docs/ARCHITECTURE.md, "Memory"). The spool is the only writer: it updates
the index after each commit that adds, removes, holds or releases
messages. Everyone else reads it, and asks it which queues a rule selects.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from ..message import AddressError, QueueName, parse_queue_name


class Selects(Protocol):
    """Criteria that select queues by name and parts (``rules.criteria.Criteria``)."""

    def matches(self, name: str, parts: QueueName) -> bool: ...


class QueueIndex:
    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._parts: dict[str, QueueName] = {}
        self._held: set[str] = set()

    # -- reads -------------------------------------------------------------

    def knows(self, name: str) -> bool:
        """Whether the spool has stored a queue of that name (its parts are known)."""
        return name in self._parts

    def count(self, name: str) -> int:
        return self._counts.get(name, 0)

    def counts(self) -> dict[str, int]:
        """Every queue that holds messages, with how many."""
        return dict(self._counts)

    def total(self) -> int:
        return sum(self._counts.values())

    def names(self) -> list[str]:
        return list(self._counts)

    def parts(self, name: str) -> QueueName:
        """What queue ``name`` is made of (parsed, for a queue never stored here)."""
        parts = self._parts.get(name)
        return parts if parts is not None else parse_queue_name(name)

    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    def matching(self, criteria: Selects) -> dict[str, int]:
        """The queues holding messages now that ``criteria`` select, with their sizes."""
        out = {}
        for name, n in list(self._counts.items()):
            try:
                parts = self.parts(name)
            except AddressError:
                continue
            if criteria.matches(name, parts):
                out[name] = n
        return out

    # -- writes: the spool's, after a commit -------------------------------

    def learn(self, parts: QueueName) -> str:
        """Remember what a queue's name is made of; returns the name."""
        name = str(parts)
        if name not in self._parts:
            self._parts[name] = parts
        return name

    def add(self, name: str, n: int = 1) -> None:
        self._counts[name] = self._counts.get(name, 0) + n

    def remove(self, name: str, n: int = 1) -> None:
        left = self._counts.get(name, 0) - n
        if left > 0:
            self._counts[name] = left
        else:
            self._counts.pop(name, None)

    def hold(self, names: Iterable[str]) -> None:
        self._held.update(names)

    def unhold(self, names: Iterable[str]) -> None:
        self._held.difference_update(names)
