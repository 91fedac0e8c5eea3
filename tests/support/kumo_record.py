"""KumoMTA's log record, as a model, to check that Sluice's records parse as KumoMTA's.

Written from the published definition of ``JsonLogRecord`` in KumoMTA's
``crates/kumo-log-types/src/lib.rs`` (with ``rfc5321::Response`` and
``bounce_classify::BounceClass``), keeping serde's rules:

- a field that is not an ``Option`` is required; an ``Option`` may be absent
  or null;
- ``timestamp`` and ``created`` are ``chrono::serde::ts_seconds``: an integer
  number of seconds (a float does not parse);
- ``nodeid`` and ``session_id`` are ``uuid::Uuid``: a UUID string;
- ``peer_address.addr`` is a ``std::net::IpAddr``: an IP address, not a name;
- ``meta`` and ``headers`` are maps; ``num_attempts`` is a u16, ``size`` a u64;
- ``bounce_classification`` is a string (``BounceClass`` is ``from = "String"``);
- unknown fields are ignored (no ``deny_unknown_fields``).

Strict mode: no coercion ("5" is not 5), as serde_json does not coerce.
"""

from __future__ import annotations

import ipaddress
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr

RecordType = Literal["Reception", "Delivery", "Bounce", "TransientFailure", "Expiration",
                     "AdminBounce", "OOB", "Feedback", "Rejection", "AdminRebind", "Any",
                     # Sluice's own record type (a restore undoing an AdminBounce), which
                     # KumoMTA's enum lacks: the one deliberate difference, in the README
                     "AdminRestore"]


def _uuid(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("a UUID must be a string")
    uuid.UUID(v)  # raises ValueError
    return v


def _ip(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("an IpAddr must be a string")
    ipaddress.ip_address(v)  # raises ValueError for a host name or ""
    return v


Uuid = Annotated[str, BeforeValidator(_uuid)]
IpAddr = Annotated[str, BeforeValidator(_ip)]
U8 = Annotated[StrictInt, Field(ge=0, le=255)]
U16 = Annotated[StrictInt, Field(ge=0, le=65535)]
U64 = Annotated[StrictInt, Field(ge=0, le=2**64 - 1)]
I64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]


class _Serde(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)


class EnhancedStatusCode(_Serde):
    class_: U8 = Field(alias="class")
    subject: U16
    detail: U16


class Response(_Serde):
    code: U16
    enhanced_code: EnhancedStatusCode | None = None
    content: StrictStr
    command: StrictStr | None = None


class ResolvedAddress(_Serde):
    name: StrictStr
    addr: IpAddr


class JsonLogRecord(_Serde):
    type: RecordType
    id: StrictStr
    sender: StrictStr
    recipient: StrictStr
    queue: StrictStr
    site: StrictStr
    size: U64
    response: Response
    peer_address: ResolvedAddress | None = None
    timestamp: I64
    created: I64
    num_attempts: U16
    bounce_classification: StrictStr
    egress_pool: StrictStr | None = None
    egress_source: StrictStr | None = None
    source_address: dict[str, Any] | None = None
    feedback_report: dict[str, Any] | None = None
    meta: dict[str, Any]
    headers: dict[str, Any]
    delivery_protocol: StrictStr | None = None
    reception_protocol: StrictStr | None = None
    nodeid: Uuid
    tls_cipher: StrictStr | None = None
    tls_protocol_version: StrictStr | None = None
    tls_peer_subject_name: list[StrictStr] | None = None
    provider_name: StrictStr | None = None
    session_id: Uuid | None = None


def parse(line: str | bytes) -> JsonLogRecord:
    """Parse one JSON line as KumoMTA would; raises pydantic.ValidationError."""
    return JsonLogRecord.model_validate_json(line)
