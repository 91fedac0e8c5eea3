"""``/api/admin/bounce/v1``: cancel queued mail (SPEC section 8)."""

from __future__ import annotations

import math

from fastapi import APIRouter, Depends, HTTPException

from ..durations import format_duration
from ..rules.criteria import Criteria
from ..rules.store import BOUNCE, Rule
from .deps import services
from .models import (
    ERROR_RESPONSES,
    BounceListEntry,
    BounceRequest,
    BounceResponse,
    DryRunResponse,
    ErrorResponse,
    RuleId,
)

router = APIRouter(prefix="/api/admin/bounce/v1", tags=["bounce"], responses=ERROR_RESPONSES)


def criteria_of(req: BounceRequest) -> Criteria:
    return Criteria(campaign=req.campaign, tenant=req.tenant, domain=req.domain,
                    routing_domain=req.routing_domain,
                    queue_names=tuple(sorted(set(req.queue_names))) if req.queue_names else None)


def list_entry(rule: Rule, remaining: float) -> dict:
    c = rule.criteria
    return {"id": rule.id, "campaign": c.campaign, "tenant": c.tenant, "domain": c.domain,
            "routing_domain": c.routing_domain, "queue_names": list(c.queue_names or ()),
            "reason": rule.reason, "duration": format_duration(math.floor(remaining))}


@router.post("", response_model=BounceResponse | DryRunResponse,
             )
async def create_bounce(req: BounceRequest, svc=Depends(services)) -> dict:
    """Bounce matching queued mail now, and matching new mail until the rule expires."""
    criteria = criteria_of(req)
    if req.dry_run:
        queues = svc.control.matching_queues(criteria)
        return {"dry_run": True, "queues": queues, "total": sum(queues.values())}
    rule = await svc.control.create(BOUNCE, criteria, req.reason, req.expires_at(),
                                    suppress_logging=req.suppress_logging)
    return {"id": rule.id, "bounced": {}, "total_bounced": 0}


@router.get("", response_model=list[BounceListEntry])
async def list_bounces(svc=Depends(services)) -> list[dict]:
    """The bounce rules in force, with what each has bounced so far."""
    out = []
    for rule in svc.rules.active(BOUNCE):
        entry = list_entry(rule, svc.control.remaining(rule))
        entry["bounced"] = {q: n for q, n in rule.bounced.items() if n}
        entry["total_bounced"] = rule.total_bounced
        out.append(entry)
    return out


@router.delete("", responses={404: {"model": ErrorResponse}})
async def cancel_bounce(req: RuleId, svc=Depends(services)) -> dict:
    """Stop a bounce rule. Mail it already bounced stays bounced."""
    if not await svc.control.cancel(BOUNCE, str(req.id)):
        raise HTTPException(status_code=404, detail=f"no active bounce rule with id {req.id}")
    return {"id": str(req.id), "cancelled": True}
