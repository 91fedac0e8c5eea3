"""``/api/admin/bounce/v1``: cancel queued mail (KumoMTA's admin bounce API),
and Sluice's undo: ``/apply`` (end a grace now) and ``/restore``."""

from __future__ import annotations

import math
import time
from typing import Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Request

from ..durations import format_duration
from ..rules.book import Rule
from ..rules.criteria import Criteria
from .auth import actor_of
from .cluster_rules import (
    before_change,
    cancel_everywhere,
    cluster_counts,
    publish_or_503,
    spread,
    summed,
)
from .deps import services
from .models import (
    ERROR_RESPONSES,
    BounceListEntry,
    BounceRequest,
    BounceResponse,
    DryRunResponse,
    ErrorResponse,
    FieldError,
    RestoreResponse,
    RuleId,
    Selection,
)

router = APIRouter(prefix="/api/admin/bounce/v1", tags=["bounce"], responses=ERROR_RESPONSES)


def criteria_of(req: Selection) -> Criteria:
    """The request's selection, normalized (the one path from operator input to criteria)."""
    try:
        return Criteria.build(campaign=req.campaign, tenant=req.tenant, domain=req.domain,
                              routing_domain=req.routing_domain, queue_names=req.queue_names,
                              sender=req.sender, recipient=req.recipient,
                              older_than=req.older_than_seconds())
    except ValueError as exc:
        field, _, problem = str(exc).partition(": ")
        raise FieldError(field if problem else "body", problem or str(exc)) from None


async def body_of(request: Request) -> Any:
    """The request's JSON body as sent (for the audit)."""
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return None


def list_entry(rule: Rule) -> dict:
    """What the lists of both rule kinds show of a rule."""
    c = rule.criteria
    return {"id": rule.id, "campaign": c.campaign, "tenant": c.tenant, "domain": c.domain,
            "routing_domain": c.routing_domain, "queue_names": list(c.queue_names or ()),
            "sender": c.sender, "recipient": c.recipient,
            "older_than": format_duration(c.older_than) if c.older_than is not None else None,
            "reason": rule.reason, "duration": format_duration(math.floor(rule.remaining()))}


@router.post("", response_model=BounceResponse | DryRunResponse, response_model_exclude_none=True)
async def create_bounce(req: BounceRequest, request: Request, svc=Depends(services)) -> dict:
    """Bounce matching queued mail now (or, with a grace, hold it until the
    grace ends), and matching new mail until the rule expires."""
    criteria = criteria_of(req)
    if req.dry_run:
        queues, samples = await svc.bounces.dry_run(criteria)
        out: dict = {"dry_run": True, "queues": queues, "total": sum(queues.values())}
        if samples is not None:
            out["samples"] = [{"id": m.id, "sender": m.sender, "recipient": m.recipient,
                               "queue": m.queue} for m in samples]
        return out
    await before_change(svc)
    actor = actor_of(request)
    rule = await svc.bounces.create(
        criteria, req.reason, req.expires_at(), suppress_logging=req.suppress_logging,
        grace=req.grace_seconds(svc.settings.admin.bounce_grace),
        actor=actor, request=await body_of(request))
    nodes = await spread(svc, lambda: svc.cluster_rules.created(rule),
                         lambda: svc.bounces.cancel(rule.id, actor, action="cancel-for-cluster"))
    return {"id": rule.id, "bounced": {}, "total_bounced": 0, "nodes": nodes}


@router.get("", response_model=list[BounceListEntry], response_model_exclude_unset=True)
async def list_bounces(svc=Depends(services)) -> list[dict]:
    """The bounce rules in force, pending or active, with what each has
    bounced so far (in a cluster: summed over the live nodes, and per node)."""
    out = []
    now = time.time()
    published = await cluster_counts(svc)
    for rule in svc.bounces.active():
        # "nodes" only in a cluster; every other field always
        entry = {**list_entry(rule), **svc.bounces.counts(rule), "state": "active",
                 "bounce_in": None, "held": None}
        if published is not None:
            entry.update(summed(rule.id, published))
        if rule.pending(now):
            entry.update(state="pending", held=await svc.bounces.held(rule),
                         bounce_in=format_duration(math.floor(rule.grace_until - now)))
        out.append(entry)
    return out


@router.delete("", responses={404: {"model": ErrorResponse}})
async def cancel_bounce(req: RuleId, request: Request, svc=Depends(services)) -> dict:
    """Stop a bounce rule. A pending rule releases what it held; mail an
    active rule already bounced stays bounced (see restore)."""
    await before_change(svc)
    if await svc.bounces.cancel(str(req.id), actor_of(request), await body_of(request)) is None:
        raise HTTPException(status_code=404, detail=f"no active bounce rule with id {req.id}")
    out: dict = {"id": str(req.id), "cancelled": True}
    if svc.cluster_rules is not None:
        out["nodes"] = await cancel_everywhere(svc, "bounce", str(req.id))
    return out


@router.post("/apply", responses={404: {"model": ErrorResponse}})
async def apply_bounce(req: RuleId, request: Request, svc=Depends(services)) -> dict:
    """End a pending rule's grace now: it bounces what it held, and from now on."""
    await before_change(svc)
    rule = await svc.bounces.apply(str(req.id), actor_of(request), await body_of(request))
    if rule is None:
        raise HTTPException(status_code=404, detail=f"no active bounce rule with id {req.id}")
    out: dict = {"id": rule.id, "state": "active"}
    if svc.cluster_rules is not None:
        out["nodes"] = await publish_or_503(svc, lambda: svc.cluster_rules.applied(rule.id))
    return out


@router.post("/restore", response_model=RestoreResponse, response_model_exclude_none=True,
             responses={404: {"model": ErrorResponse}})
async def restore_bounce(req: RuleId, request: Request, svc=Depends(services)) -> dict:
    """Put back everything a bounce rule bounced that is still retained (the
    rule ends first if it is in force)."""
    await before_change(svc)
    result = await svc.bounces.restore(str(req.id), actor_of(request), await body_of(request))
    if result is None:
        raise HTTPException(status_code=404, detail=f"no bounce rule with id {req.id} within "
                            "the retention window")
    out: dict = {"restored": result.restored, "total_restored": result.total,
                 "unavailable": result.unavailable}
    if svc.cluster_rules is not None:  # each node puts back what it retained
        out["nodes"] = await publish_or_503(svc, lambda: svc.cluster_rules.restored(str(req.id)))
    return out
