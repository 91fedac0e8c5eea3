"""Request and response types of the admin API, in one place.

Field names and defaults follow KumoMTA's admin API. Unknown fields are
rejected; a bad value raises a validation error naming the field (422).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    field_validator,
    model_validator,
)

from ..durations import parse_duration, parse_positive_duration
from ..message import AddressError, normalize_domain

DEFAULT_DURATION = "5m"


def _domain(v: str | None) -> str | None:
    if v is None:
        return None
    try:
        return normalize_domain(v)
    except AddressError as exc:
        raise ValueError(str(exc)) from None


def _label(v: str | None) -> str | None:
    if v is None:
        return None
    v = v.strip()
    if not v:
        raise ValueError("must not be empty")
    return v


def _pattern(v: str | None) -> str | None:
    v = _label(v)
    if v is not None and (len(v) > 320 or any(c.isspace() or not c.isprintable() for c in v)):
        raise ValueError("must be an address glob (no spaces, at most 320 characters)")
    return v


Domain = Annotated[StrictStr | None, AfterValidator(_domain)]
Label = Annotated[StrictStr | None, AfterValidator(_label)]
Pattern = Annotated[StrictStr | None, AfterValidator(_pattern)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Selection(_Strict):
    """Which mail: queue criteria (or exact queue names) and per-message ones."""

    campaign: Label = None
    tenant: Label = None
    domain: Domain = None
    routing_domain: Domain = None
    queue_names: list[StrictStr] | None = Field(
        default=None, description="Exact scheduled queue names, instead of criteria.")
    sender: Pattern = Field(default=None, description=(
        "Envelope sender glob (* and ?), case-insensitive, e.g. '*@compromised.example'."))
    recipient: Pattern = Field(default=None, description="Envelope recipient glob, likewise.")
    older_than: StrictStr | None = Field(
        default=None, description="Only messages created more than this long ago, e.g. '2h'.")

    @field_validator("queue_names")
    @classmethod
    def _queue_names(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        names = [q.strip() for q in v]
        if not names or any(not q for q in names):
            raise ValueError("must be a non-empty list of non-empty queue names")
        return names

    @field_validator("older_than")
    @classmethod
    def _older_than(cls, v: str | None) -> str | None:
        if v is not None:
            parse_positive_duration(v)
        return v

    def older_than_seconds(self) -> float | None:
        return parse_positive_duration(self.older_than) if self.older_than is not None else None

    @model_validator(mode="after")
    def _one_way(self) -> Selection:
        if self.queue_names is not None and any(
                (self.campaign, self.tenant, self.domain, self.routing_domain)):
            raise ValueError("queue_names cannot be combined with campaign, tenant, domain "
                             "or routing_domain")
        return self


def _reason(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    return v


Reason = Annotated[StrictStr, AfterValidator(_reason)]


class RuleRequest(Selection):
    """What bounce and suspend rules have in common: selection and lifetime."""

    reason: Reason = Field(description="Why; shown in the list and the log records.")
    duration: StrictStr | None = Field(
        default=None, description="How long the rule stays in force, e.g. '5m', '1h 30m' (default 5m).")
    expires: dt.datetime | None = Field(
        default=None, description="RFC 3339 time the rule ends, instead of duration.")

    @field_validator("duration")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is not None:
            parse_positive_duration(v)
        return v

    @field_validator("expires")
    @classmethod
    def _expires(cls, v: dt.datetime | None) -> dt.datetime | None:
        if v is None:
            return None
        if v.tzinfo is None:
            raise ValueError("must include a time zone (RFC 3339), e.g. 2026-01-01T00:00:00Z")
        if v.timestamp() <= time.time():
            raise ValueError("must be in the future")
        return v

    @model_validator(mode="after")
    def _exclusive(self) -> RuleRequest:
        if self.duration is not None and self.expires is not None:
            raise ValueError("give either duration or expires, not both")
        return self

    def expires_at(self) -> float:
        if self.expires is not None:
            return self.expires.timestamp()
        return time.time() + parse_duration(self.duration or DEFAULT_DURATION)


class BounceRequest(RuleRequest):
    suppress_logging: StrictBool = Field(default=False, description="Write no AdminBounce records.")
    dry_run: StrictBool = Field(default=False, description="Only report what would be bounced.")
    grace: StrictStr | None = Field(default=None, description=(
        "Hold matching mail this long before bouncing it, e.g. '10m' (default: [admin] "
        "bounce_grace, itself 0s: at once)."))

    @field_validator("grace")
    @classmethod
    def _grace(cls, v: str | None) -> str | None:
        if v is not None:
            parse_duration(v)
        return v

    def grace_seconds(self, default: float) -> float:
        return parse_duration(self.grace) if self.grace is not None else default


class BounceResponse(BaseModel):
    id: str
    bounced: dict[str, int]
    total_bounced: int
    nodes: dict[str, str] | None = None  # in a cluster: "confirmed" or "unreachable" per node


class Sample(BaseModel):
    id: str
    sender: str
    recipient: str
    queue: str


class DryRunResponse(BaseModel):
    dry_run: bool = True
    queues: dict[str, int]
    total: int
    samples: list[Sample] | None = None


class RuleListEntry(BaseModel):
    id: str
    campaign: str | None
    tenant: str | None
    domain: str | None
    routing_domain: str | None
    queue_names: list[str]
    sender: str | None = None
    recipient: str | None = None
    older_than: str | None = None
    reason: str
    duration: str


class BounceListEntry(RuleListEntry):
    state: str = Field(description="'pending' in its grace (holding mail), else 'active'.")
    bounce_in: str | None = Field(default=None, description="Time left in the grace.")
    held: dict[str, int] | None = Field(default=None, description="What a pending rule holds.")
    bounced: dict[str, int]
    total_bounced: int
    nodes: dict[str, dict[str, Any]] | None = Field(
        default=None, description="In a cluster: each live node's own bounced and "
        "total_bounced (as it last published them, at most 2 s old); the counts above are "
        "their sums.")


class RestoreResponse(BaseModel):
    restored: dict[str, int]
    total_restored: int
    unavailable: int = Field(description="Bounced by the rule but no longer retained.")
    nodes: dict[str, str] | None = Field(
        default=None, description="In a cluster: each node restores what it retained; "
        "'confirmed' or 'unreachable' per node (the counts are this node's).")


class AuditEntry(BaseModel):
    time: str
    action: str
    rule_id: str | None
    actor: str
    remote_addr: str | None
    request: object | None
    matched: dict[str, int] | None
    result: object | None


class RuleId(_Strict):
    id: uuid.UUID


class SuspendRequest(RuleRequest):
    pass


class SuspendResponse(BaseModel):
    id: str
    nodes: dict[str, str] | None = None  # in a cluster: "confirmed" or "unreachable" per node


class ErrorResponse(BaseModel):
    error: str


class FieldProblem(BaseModel):
    field: str
    problem: str


class FieldError(Exception):
    """A request field whose value cannot be used; answered as 422 naming it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class ValidationErrorResponse(BaseModel):
    error: str
    detail: list[FieldProblem]


# Error answers every API route may give (documented in the OpenAPI document).
ERROR_RESPONSES: dict[int | str, dict] = {
    400: {"model": ErrorResponse, "description": "Unreadable request body"},
    401: {"model": ErrorResponse, "description": "Not a trusted host and no valid token"},
    422: {"model": ValidationErrorResponse, "description": "A field is missing or invalid"},
}


class InspectResponse(BaseModel):
    id: str
    sender: str
    recipient: str
    queue: str
    meta: dict[str, str]
    created: str
    attempts: int
    due: str
    body: str | None = None


class InjectAddress(_Strict):
    email: StrictStr
    name: StrictStr | None = None


class InjectRecipient(_Strict):
    email: StrictStr
    name: StrictStr | None = None
    substitutions: dict[str, object] | None = None


class InjectAttachment(_Strict):
    data: StrictStr
    base64: StrictBool = False
    content_type: StrictStr = "application/octet-stream"
    file_name: StrictStr | None = None
    content_id: StrictStr | None = None


class InjectBuilder(_Strict):
    """KumoMTA's content builder: parts and headers instead of a full message."""

    subject: StrictStr | None = None
    text_body: StrictStr | None = None
    html_body: StrictStr | None = None
    amp_html_body: StrictStr | None = None
    attachments: list[InjectAttachment] = []
    inline: list[InjectAttachment] = []
    headers: dict[str, StrictStr] = {}
    from_: InjectAddress | None = Field(default=None, alias="from")
    reply_to: InjectAddress | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _has_body(self) -> InjectBuilder:
        if not (self.text_body or self.html_body or self.amp_html_body):
            raise ValueError("needs text_body or html_body")
        return self


class InjectRequest(_Strict):
    envelope_sender: StrictStr
    recipients: list[InjectRecipient] = Field(min_length=1)
    content: StrictStr | InjectBuilder
    substitutions: dict[str, object] | None = None
    template_dialect: StrictStr | None = None

    @field_validator("template_dialect")
    @classmethod
    def _dialect(cls, v: str | None) -> str | None:
        if v is not None and v.lower() not in ("jinja", "jinja2"):
            raise ValueError("only 'Jinja' templates are supported")
        return v


class InjectResponse(BaseModel):
    success_count: int
    fail_count: int
    failed_recipients: list[str]
    errors: list[str]


XFER_QUEUE_SUFFIX = ".xfer.kumomta.internal"  # KumoMTA's name of an xfer's queue: <target> + this


def _target(v: str) -> str:
    v = v.strip()
    scheme, sep, rest = v.partition("://")
    host = rest.rstrip("/")
    if (not sep or scheme.lower() not in ("http", "https") or not host
            or any(c in host for c in "/?#@ ")):
        raise ValueError("must be the other node's HTTP API base URL, like "
                         "'http://10.0.0.2:8000' (no path)")
    return f"{scheme.lower()}://{host}"


Target = Annotated[StrictStr, AfterValidator(_target)]


class XferRequest(Selection):
    """KumoMTA's xfer: which mail, to which node, why."""

    target: Target = Field(description="The other node's HTTP API base URL, e.g. "
                                       "'http://10.0.0.2:8000'.")
    reason: Reason = Field(description="Written into each message's AdminRebind record.")


class XferResponse(BaseModel):
    id: str
    target: str
    queue_name: str = Field(description="The xfer's queue, as KumoMTA names it (for xfer-cancel).")


class XferListEntry(BaseModel):
    id: str
    target: str
    queue_name: str
    reason: str
    criteria: dict[str, Any]
    state: str = Field(description="'running', 'cancelled' or 'done'.")
    waiting: int = Field(description="Taken out of their queues, not sent yet.")
    sent: int = Field(description="Sent, waiting for the target's confirmation.")
    moved: int = Field(description="Stored by the target and gone from this node.")
    returned: int = Field(description="Given back to their queues by a cancel.")
    error: str | None = Field(default=None, description="The last failure to reach the target.")


class XferCancelRequest(_Strict):
    id: StrictStr | None = Field(default=None, description="The xfer's id.")
    queue_name: StrictStr | None = Field(
        default=None, description="Or its queue name (every xfer to that target).")
    reason: Reason = Field(description="Written into the AdminRebind record of each message "
                                       "given back to its queue.")

    @model_validator(mode="after")
    def _one(self) -> XferCancelRequest:
        if (self.id is None) == (self.queue_name is None):
            raise ValueError("give either id or queue_name")
        if self.queue_name is not None and not self.queue_name.endswith(XFER_QUEUE_SUFFIX):
            raise ValueError(f"queue_name: must end with {XFER_QUEUE_SUFFIX}")
        return self


class XferCancelResponse(BaseModel):
    cancelled: list[str]
    returned: dict[str, int] = Field(description="Messages given back, per queue.")
    total_returned: int
    in_flight: int = Field(description="Already sent: they finish moving to the target "
                                       "(the target may hold them already).")
