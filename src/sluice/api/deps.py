"""Access to the running server's parts from request handlers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from ..server import Services


def services(request: Request) -> Services:
    return request.app.state.services
