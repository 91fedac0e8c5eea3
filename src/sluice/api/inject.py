"""``POST /api/inject/v1``: KumoMTA-compatible HTTP injection."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Depends, HTTPException, Request

from ..message import AddressError, split_address
from ..reception.inject import Composer, TemplateProblem, check_recipient
from .deps import services
from .models import ERROR_RESPONSES, ErrorResponse, FieldError, InjectRequest, InjectResponse

log = logging.getLogger(__name__)

router = APIRouter(tags=["inject"], responses=ERROR_RESPONSES)


@router.post("/api/inject/v1", response_model=InjectResponse, responses={
    503: {"model": ErrorResponse,
          "description": "A message could not be DKIM-signed; nothing was queued, try again"}})
async def inject(req: InjectRequest, request: Request, svc=Depends(services)) -> dict:
    """Queue one message per recipient; answers once they are durable.

    Every distinct message is DKIM-signed (when its From domain has a key)
    before any is stored: a signing failure queues nothing."""
    if req.envelope_sender:
        try:
            split_address(req.envelope_sender)
        except AddressError as exc:
            raise FieldError("envelope_sender", str(exc)) from None
    try:
        composer = Composer(req, svc.settings.smtp.hostname)
    except TemplateProblem as exc:
        raise FieldError(exc.field, exc.problem) from None
    failed: list[str] = []
    errors: list[str] = []
    bodies: dict[bytes, list[str]] = {}
    for rcpt in req.recipients:
        problem = check_recipient(rcpt.email)
        if problem is None:
            try:
                body = composer.render(rcpt)
            except Exception as exc:  # a template error at render time (e.g. a bad filter)
                problem = f"template error: {exc}"
        if problem is not None:
            failed.append(rcpt.email)
            errors.append(f"{rcpt.email}: {problem}")
            continue
        if len(body) > svc.settings.smtp.max_message_size:
            failed.append(rcpt.email)
            errors.append(f"{rcpt.email}: message size exceeds fixed maximum message size")
            continue
        bodies.setdefault(body, []).append(rcpt.email)
    signed = list(bodies.items())
    if svc.dkim is not None:
        try:
            signed = [(svc.dkim.sign(body), rcpts) for body, rcpts in signed]
        except svc.dkim.Error as exc:
            log.warning("DKIM signing failed, answered 503: %s", exc)
            raise HTTPException(status_code=503, detail=f"DKIM signing failed, nothing was "
                                f"queued: {exc}") from None
    peer = ("", request.client.host) if request.client and request.client.host else None
    await asyncio.gather(*(
        svc.intake.accept(body, req.envelope_sender, rcpts, protocol="HTTP", peer=peer,
                          session_id=None)
        for body, rcpts in signed))
    ok = sum(len(r) for r in bodies.values())
    return {"success_count": ok, "fail_count": len(failed), "failed_recipients": failed,
            "errors": errors}
