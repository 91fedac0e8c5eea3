"""Rules in memory: ``Rule`` and ``RuleBook``, the active rules of one kind.

A book answers the question every checkpoint asks (``match``: which active
rule applies to this queue?) from a per-queue cache that any change clears.
The main process keeps one book per kind inside ``rules.bounce.Bounces``
and ``rules.suspend.Suspensions``; the delivery process keeps copies, pushed
to it whenever a rule comes or goes.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..message import QueueName
from .criteria import Criteria, Envelope

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
    grace_until: float = 0.0  # a bounce rule holds matching mail until then
    bounced: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def total_bounced(self) -> int:
        return sum(self.bounced.values())

    def active(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) < self.expires

    def pending(self, now: float | None = None) -> bool:
        """In its grace: matching mail is held, not bounced."""
        return (time.time() if now is None else now) < self.grace_until

    def remaining(self, now: float | None = None) -> float:
        """Seconds until the rule ends (0 once it has)."""
        return max(0.0, self.expires - (time.time() if now is None else now))

    def to_row(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "criteria": self.criteria.as_dict(),
                "reason": self.reason, "created": self.created, "expires": self.expires,
                "suppress_logging": self.suppress_logging, "grace_until": self.grace_until}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Rule:
        bounced: dict[str, int] = defaultdict(int)
        bounced.update(row.get("bounced") or {})
        return cls(id=row["id"], kind=row["kind"], criteria=Criteria.from_dict(row["criteria"]),
                   reason=row["reason"], created=row["created"], expires=row["expires"],
                   suppress_logging=row["suppress_logging"],
                   grace_until=row.get("grace_until", 0.0), bounced=bounced)


def new_rule(kind: str, criteria: Criteria, reason: str, expires: float,
             suppress_logging: bool = False, grace: float = 0.0) -> Rule:
    now = time.time()
    return Rule(id=str(uuid.uuid4()), kind=kind, criteria=criteria, reason=reason,
                created=now, expires=expires, suppress_logging=suppress_logging,
                grace_until=now + grace if grace > 0 else 0.0)


class RuleBook:
    """The rules of one kind, with a per-queue match cache."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._rules: dict[str, Rule] = {}
        self._cache: dict[str, tuple[Rule, ...]] = {}
        self.version = 0

    def load(self, rows: list[dict[str, Any]]) -> list[str]:
        """Activate stored rules of this kind; returns the ids of those already expired."""
        now = time.time()
        expired = []
        for row in rows:
            if row["kind"] != self.kind:
                continue
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

    def touch(self) -> None:
        """A rule changed in place (its end moved)."""
        self._changed()

    def _changed(self) -> None:
        self._cache.clear()
        self.version += 1

    def __bool__(self) -> bool:
        return bool(self._rules)

    def get(self, rule_id: str) -> Rule | None:
        """The active rule with that id, if any."""
        rule = self._rules.get(rule_id)
        return rule if rule is not None and rule.active() else None

    def same_criteria(self, criteria: Criteria) -> list[Rule]:
        return [r for r in self._rules.values() if r.criteria == criteria]

    def active(self) -> list[Rule]:
        now = time.time()
        return sorted((r for r in self._rules.values() if r.active(now)), key=lambda r: r.created)

    def expired(self) -> list[Rule]:
        now = time.time()
        return [r for r in self._rules.values() if not r.active(now)]

    def match(self, name: str, parts: QueueName, msg: Envelope | None = None) -> Rule | None:
        """The active rule that applies to a message of queue ``name``, if any.

        Rules with per-message criteria apply only when ``msg`` is given and
        matches them: without ``msg`` the question is "does a rule select this
        whole queue?"."""
        rules = self._cache.get(name)
        if rules is None:
            # the rules whose queue criteria select this queue, expired or not
            rules = tuple(r for r in self._rules.values() if r.criteria.matches(name, parts))
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[name] = rules
        if not rules:
            return None
        now = time.time()
        for r in rules:
            if not r.active(now):
                continue
            if not r.criteria.per_message:
                return r
            if msg is not None and r.criteria.matches_message(msg, now):
                return r
        return None
