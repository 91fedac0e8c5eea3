"""The FastAPI application: routers, access control, error bodies.

Every error answer is JSON with an ``error`` text; validation errors also
carry ``detail`` with the field path, so a caller knows which field to fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from . import audit, bounce, inject, inspect, metrics, status, suspend, xfer
from .auth import Access
from .limits import BodyLimit
from .models import FieldError

if TYPE_CHECKING:
    from ..server import Services


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query")]
    return ".".join(parts) or "body"


def _json_problem(err: dict, doc: Any) -> str:
    """'invalid JSON: Expecting value at line 1, column 12' for a body that
    does not parse (FastAPI gives the offset and the decoder's message)."""
    reason = str((err.get("ctx") or {}).get("error", "not valid JSON"))
    loc = err.get("loc", ())
    pos = loc[-1] if loc and isinstance(loc[-1], int) else None
    if pos is None or not isinstance(doc, (str, bytes)):
        return f"invalid JSON: {reason}"
    text = doc.decode("utf-8", "replace") if isinstance(doc, bytes) else doc
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"invalid JSON: {reason} at line {line}, column {column}"


def create_app(services: Services) -> FastAPI:
    app = FastAPI(title="Sluice", version=__version__, openapi_url="/api-docs/openapi.json",
                  docs_url="/api-docs")
    app.state.services = services
    guard = [Depends(Access(services.settings.http))]
    for module in (bounce, suspend, xfer, audit, inspect, inject, status, metrics):
        app.include_router(module.router, dependencies=guard)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = []
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                details.append({"field": "body", "problem": _json_problem(err, exc.body)})
                continue
            field = _field(tuple(err.get("loc", ())))
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            if err.get("type") == "extra_forbidden":
                msg = "unknown field"
            details.append({"field": field, "problem": msg})
        text = "; ".join(f"{d['field']}: {d['problem']}" for d in details)
        return JSONResponse(status_code=422, content={"error": text, "detail": details})

    @app.exception_handler(FieldError)
    async def _field_error(request: Request, exc: FieldError) -> JSONResponse:
        return JSONResponse(status_code=422, content={
            "error": f"{exc.field}: {exc.problem}",
            "detail": [{"field": exc.field, "problem": exc.problem}]})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)},
                            headers=getattr(exc, "headers", None))

    # Room for an injected message of the largest size, JSON-escaped.
    app.add_middleware(BodyLimit, max_bytes=2 * services.settings.smtp.max_message_size + 65536)
    return app
