"""Who did what: the audit entry of every admin write.

An entry is one JSON object, written by the spool in the same transaction
as the change it describes (the ``audit`` table, and ``logs/audit.jsonl``
through the outbox): time, action, rule id, actor, remote address, the
request as sent, what the rule matched when it was made, and the result.

The actor is ``token:<name>`` for a bearer token (the name from a
``name:token`` line of ``tokens_file``, else the first 8 hex digits of the
token's SHA-256), ``host:<ip>`` for a trusted host, or
``automation:<rule>`` for rules the server makes itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from .logs import rfc3339


@dataclass(frozen=True, slots=True)
class Actor:
    name: str
    remote_addr: str | None = None


SERVER = Actor("server")  # changes the server makes by itself (a rule that expires)


def entry(action: str, actor: Actor, *, rule_id: str | None = None,
          request: Any = None, matched: dict[str, int] | None = None,
          result: Any = None) -> bytes:
    """One audit entry, serialized."""
    return orjson.dumps({"time": rfc3339(time.time()), "action": action, "rule_id": rule_id,
                         "actor": actor.name, "remote_addr": actor.remote_addr,
                         "request": request, "matched": matched, "result": result})
