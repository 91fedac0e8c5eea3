"""The active rules, in memory, backed by the spool.

Every place that enforces a rule asks this book: reception (enqueue),
promotion (due), dispatch (before DATA) and requeue after a transient
failure. Lookups are cached per queue name; any change clears the cache.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..message import QueueName
from .criteria import Criteria

BOUNCE = "bounce"
SUSPEND = "suspend"


@dataclass(slots=True)
class Rule:
    id: str
    kind: str
    criteria: Criteria
    reason: str
    created: float
    expires: float
    suppress_logging: bool = False
    bounced: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def total_bounced(self) -> int:
        return sum(self.bounced.values())

    def active(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) < self.expires

    def to_row(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "criteria": self.criteria.as_dict(),
                "reason": self.reason, "created": self.created, "expires": self.expires,
                "suppress_logging": self.suppress_logging}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Rule:
        bounced: dict[str, int] = defaultdict(int)
        bounced.update(row.get("bounced") or {})
        return cls(id=row["id"], kind=row["kind"], criteria=Criteria.from_dict(row["criteria"]),
                   reason=row["reason"], created=row["created"], expires=row["expires"],
                   suppress_logging=row["suppress_logging"], bounced=bounced)


def new_rule(kind: str, criteria: Criteria, reason: str, expires: float,
             suppress_logging: bool = False) -> Rule:
    return Rule(id=str(uuid.uuid4()), kind=kind, criteria=criteria, reason=reason,
                created=time.time(), expires=expires, suppress_logging=suppress_logging)


class RuleBook:
    """Active bounce and suspend rules, with a per-queue match cache."""

    def __init__(self) -> None:
        self._rules: dict[str, Rule] = {}
        self._cache: dict[tuple[str, str], Rule | None] = {}
        self.version = 0

    def load(self, rows: list[dict[str, Any]]) -> list[str]:
        """Activate stored rules; returns the ids of those already expired."""
        now = time.time()
        expired = []
        for row in rows:
            rule = Rule.from_row(row)
            if rule.active(now):
                self._rules[rule.id] = rule
            else:
                expired.append(rule.id)
        self._changed()
        return expired

    def add(self, rule: Rule) -> None:
        self._rules[rule.id] = rule
        self._changed()

    def remove(self, rule_id: str) -> Rule | None:
        rule = self._rules.pop(rule_id, None)
        self._changed()
        return rule

    def _changed(self) -> None:
        self._cache.clear()
        self.version += 1

    def has(self, kind: str) -> bool:
        return any(r.kind == kind for r in self._rules.values())

    def get(self, rule_id: str, kind: str | None = None) -> Rule | None:
        rule = self._rules.get(rule_id)
        if rule is None or (kind and rule.kind != kind) or not rule.active():
            return None
        return rule

    def same_criteria(self, kind: str, criteria: Criteria) -> list[Rule]:
        return [r for r in self._rules.values() if r.kind == kind and r.criteria == criteria]

    def active(self, kind: str) -> list[Rule]:
        now = time.time()
        return sorted((r for r in self._rules.values() if r.kind == kind and r.active(now)),
                      key=lambda r: r.created)

    def expired(self) -> list[Rule]:
        now = time.time()
        return [r for r in self._rules.values() if not r.active(now)]

    def match(self, kind: str, name: str, parts: QueueName) -> Rule | None:
        """The active rule of ``kind`` that applies to queue ``name``, if any."""
        key = (kind, name)
        rule = self._cache.get(key, False)
        if rule is False or (rule is not None and not rule.active()):
            now = time.time()
            rule = None
            for r in self._rules.values():
                if r.kind == kind and r.active(now) and r.criteria.matches(name, parts):
                    rule = r
                    break
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[key] = rule
        return rule

    def bounce_for(self, name: str, parts: QueueName) -> Rule | None:
        return self.match(BOUNCE, name, parts)

    def suspended(self, name: str, parts: QueueName) -> Rule | None:
        return self.match(SUSPEND, name, parts)

    def stops(self, name: str, parts: QueueName) -> bool:
        """A bounce or suspend rule keeps mail of queue ``name`` from being sent."""
        return self.bounce_for(name, parts) is not None or self.suspended(name, parts) is not None
