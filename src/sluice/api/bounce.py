"""``/api/admin/bounce/v1``: cancel queued mail (KumoMTA's admin bounce API)."""

from __future__ import annotations

import math

from fastapi import APIRouter, Depends, HTTPException

from ..durations import format_duration
from ..rules.book import Rule
from ..rules.criteria import Criteria
from .deps import services
from .models import (
    ERROR_RESPONSES,
    BounceListEntry,
    BounceRequest,
    BounceResponse,
    DryRunResponse,
    ErrorResponse,
    FieldError,
    RuleId,
    RuleRequest,
)

router = APIRouter(prefix="/api/admin/bounce/v1", tags=["bounce"], responses=ERROR_RESPONSES)


def criteria_of(req: RuleRequest) -> Criteria:
    """The request's selection, normalized (the one path from operator input to criteria)."""
    try:
        return Criteria.build(campaign=req.campaign, tenant=req.tenant, domain=req.domain,
                              routing_domain=req.routing_domain, queue_names=req.queue_names,
                              sender=req.sender, recipient=req.recipient,
                              older_than=req.older_than_seconds())
    except ValueError as exc:
        field, _, problem = str(exc).partition(": ")
        raise FieldError(field if problem else "body", problem or str(exc)) from None


def list_entry(rule: Rule) -> dict:
    """What the lists of both rule kinds show of a rule."""
    c = rule.criteria
    return {"id": rule.id, "campaign": c.campaign, "tenant": c.tenant, "domain": c.domain,
            "routing_domain": c.routing_domain, "queue_names": list(c.queue_names or ()),
            "sender": c.sender, "recipient": c.recipient,
            "older_than": format_duration(c.older_than) if c.older_than is not None else None,
            "reason": rule.reason, "duration": format_duration(math.floor(rule.remaining()))}


@router.post("", response_model=BounceResponse | DryRunResponse, response_model_exclude_none=True)
async def create_bounce(req: BounceRequest, svc=Depends(services)) -> dict:
    """Bounce matching queued mail now, and matching new mail until the rule expires."""
    criteria = criteria_of(req)
    if req.dry_run:
        queues, samples = await svc.bounces.dry_run(criteria)
        out: dict = {"dry_run": True, "queues": queues, "total": sum(queues.values())}
        if samples is not None:
            out["samples"] = [{"id": m.id, "sender": m.sender, "recipient": m.recipient,
                               "queue": m.queue} for m in samples]
        return out
    rule = await svc.bounces.create(criteria, req.reason, req.expires_at(),
                                    suppress_logging=req.suppress_logging)
    return {"id": rule.id, "bounced": {}, "total_bounced": 0}


@router.get("", response_model=list[BounceListEntry])
async def list_bounces(svc=Depends(services)) -> list[dict]:
    """The bounce rules in force, with what each has bounced so far."""
    return [{**list_entry(rule), **svc.bounces.counts(rule)} for rule in svc.bounces.active()]


@router.delete("", responses={404: {"model": ErrorResponse}})
async def cancel_bounce(req: RuleId, svc=Depends(services)) -> dict:
    """Stop a bounce rule. Mail it already bounced stays bounced."""
    if await svc.bounces.cancel(str(req.id)) is None:
        raise HTTPException(status_code=404, detail=f"no active bounce rule with id {req.id}")
    return {"id": str(req.id), "cancelled": True}
