"""``/api/admin/xfer/v1``: move matching queued mail to another node
(KumoMTA's xfer), ``/api/admin/xfer-cancel/v1`` to stop it, and the
receiving end another node's xfer POSTs its batches to."""

from __future__ import annotations

import msgspec
from fastapi import APIRouter, Depends, HTTPException, Request

from ..durations import format_duration
from ..cluster.xfer import TargetError, queue_name
from ..spool.sqlite import SpoolClosed
from ..xfer import RECEIVE_PATH, decode_batch
from .auth import actor_of
from .bounce import body_of, criteria_of
from .deps import services
from .models import (
    ERROR_RESPONSES,
    XFER_QUEUE_SUFFIX,
    ErrorResponse,
    FieldError,
    XferCancelRequest,
    XferCancelResponse,
    XferListEntry,
    XferRequest,
    XferResponse,
)

router = APIRouter(tags=["xfer"], responses=ERROR_RESPONSES)


@router.post("/api/admin/xfer/v1", response_model=XferResponse,
             responses={502: {"model": ErrorResponse}})
async def create_xfer(req: XferRequest, request: Request, svc=Depends(services)) -> dict:
    """Move matching queued mail to the node at ``target``, in the
    background; each message leaves this node only once the target stored
    it. No criteria: every queue."""
    criteria = criteria_of(req)
    try:
        x = await svc.transfers.create(criteria, req.target, req.reason, actor_of(request),
                                       await body_of(request))
    except TargetError as exc:
        raise HTTPException(status_code=502, detail=f"target: {exc}") from None
    return {"id": x.id, "target": x.target, "queue_name": queue_name(x.target)}


@router.get("/api/admin/xfer/v1", response_model=list[XferListEntry])
async def list_xfers(svc=Depends(services)) -> list[dict]:
    """Every xfer of this node, running or ended, with its counts."""
    out = await svc.transfers.list()
    for row in out:  # as the rule lists show it: "2h", not seconds
        older = row["criteria"].get("older_than")
        if older is not None:
            row["criteria"]["older_than"] = format_duration(older)
    return out


async def _cancel(req: XferCancelRequest, request: Request, svc) -> dict:
    if req.id is not None:
        xfers = svc.transfers.find(xfer_id=req.id)
    else:
        xfers = svc.transfers.find(target=req.queue_name.removesuffix(XFER_QUEUE_SUFFIX))
    if not xfers:
        raise HTTPException(status_code=404, detail=f"no running xfer {req.id or req.queue_name}")
    back, in_flight = await svc.transfers.cancel(xfers, req.reason, actor_of(request),
                                                 await body_of(request))
    return {"cancelled": [x.id for x in xfers], "returned": back,
            "total_returned": sum(back.values()), "in_flight": in_flight}


@router.post("/api/admin/xfer-cancel/v1", response_model=XferCancelResponse,
             responses={404: {"model": ErrorResponse}})
async def cancel_xfer(req: XferCancelRequest, request: Request, svc=Depends(services)) -> dict:
    """Stop an xfer: what it took and has not sent goes back to its queues."""
    return await _cancel(req, request, svc)


@router.post("/api/admin/xfer/cancel/v1", response_model=XferCancelResponse,
             responses={404: {"model": ErrorResponse}}, include_in_schema=False)
async def cancel_xfer_kumo_path(req: XferCancelRequest, request: Request,
                                svc=Depends(services)) -> dict:
    """KumoMTA's path of xfer-cancel."""
    return await _cancel(req, request, svc)


@router.post(RECEIVE_PATH, responses={503: {"model": ErrorResponse}})
async def receive_xfer(request: Request, svc=Depends(services)) -> dict:
    """Another node's xfer batch (MessagePack, see ``sluice.xfer``): stored
    durably before the answer, which says what was new and what was held
    already."""
    try:
        batch = decode_batch(await request.body())
    except msgspec.ValidationError as exc:
        raise FieldError("body", f"not an xfer batch: {exc}") from None
    except msgspec.DecodeError:
        raise FieldError("body", "not an xfer batch (MessagePack expected)") from None
    peer = (request.client.host, request.client.host) if request.client else None
    try:
        stored, known = await svc.intake.accept_transferred(batch, peer)
    except ValueError as exc:
        field, _, problem = str(exc).partition(": ")
        raise FieldError(field, problem) from None
    except SpoolClosed:
        raise HTTPException(status_code=503, detail="shutting down") from None
    return {"node": svc.intake.nodeid, "stored": stored, "known": known}
