"""HTTP injection (KumoMTA's ``/api/inject/v1``): templates to messages.

The content, a full RFC 5322 message or a builder object, is a Jinja2
template rendered once per recipient with the request's substitutions and
the recipient's own (which win). Recipients whose rendered message is the
same share one stored body.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formataddr, formatdate, make_msgid
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.sandbox

from ..message import AddressError, split_address
from .lines import fold_long_lines

if TYPE_CHECKING:  # the request types live with the API's other types
    from ..api.models import InjectAttachment, InjectBuilder, InjectRequest

_ENV = jinja2.sandbox.ImmutableSandboxedEnvironment(autoescape=False, keep_trailing_newline=True)


class TemplateProblem(ValueError):
    """A template that cannot be compiled; ``field`` names where it is."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.problem = message


def _compile(field: str, text: str | None) -> jinja2.Template | None:
    if text is None:
        return None
    try:
        return _ENV.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateProblem(field, f"template syntax error on line {exc.lineno}: {exc.message}") from None


def _crlf(text: str) -> bytes:
    data = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
    if not data.endswith("\r\n"):
        data += "\r\n"
    return data.encode("utf-8")


class Composer:
    """Compiles a request's templates once; renders one message per recipient."""

    def __init__(self, req: InjectRequest, hostname: str) -> None:
        self.req = req
        self.hostname = hostname
        content = req.content
        if isinstance(content, str):
            self.raw = _compile("content", content)
            self.parts: dict[str, jinja2.Template | None] = {}
        else:
            self.raw = None
            self.parts = {
                "subject": _compile("content.subject", content.subject),
                "text_body": _compile("content.text_body", content.text_body),
                "html_body": _compile("content.html_body", content.html_body),
                "amp_html_body": _compile("content.amp_html_body", content.amp_html_body),
            }
            self.headers = {k: _compile(f"content.headers.{k}", v) for k, v in content.headers.items()}
            for i, att in enumerate([*content.attachments, *content.inline]):
                if att.base64:
                    try:
                        base64.b64decode(att.data, validate=True)
                    except (binascii.Error, ValueError):
                        raise TemplateProblem(f"content.attachments.{i}.data",
                                              "not valid base64") from None

    def render(self, rcpt: Any) -> bytes:
        ctx = {"email": rcpt.email, "name": rcpt.name or "", **(self.req.substitutions or {}),
               **(rcpt.substitutions or {})}
        if self.raw is not None:
            return fold_long_lines(_crlf(self.raw.render(ctx)))
        return self._build(ctx, rcpt)

    def _build(self, ctx: dict[str, Any], rcpt: Any) -> bytes:
        b: InjectBuilder = self.req.content  # type: ignore[assignment]
        msg = EmailMessage(policy=SMTP)
        if b.from_ is not None:
            msg["From"] = formataddr((b.from_.name or "", b.from_.email))
        else:
            msg["From"] = self.req.envelope_sender
        msg["To"] = formataddr((rcpt.name or "", rcpt.email))
        if self.parts["subject"] is not None:
            msg["Subject"] = self.parts["subject"].render(ctx)
        if b.reply_to is not None:
            msg["Reply-To"] = formataddr((b.reply_to.name or "", b.reply_to.email))
        for name, tmpl in self.headers.items():
            if tmpl is not None:
                msg[name] = tmpl.render(ctx)
        if "Date" not in msg:
            msg["Date"] = formatdate(usegmt=True)
        if "Message-ID" not in msg:
            msg["Message-ID"] = make_msgid(domain=self.hostname)
        text, html = self.parts["text_body"], self.parts["html_body"]
        if text is not None:
            msg.set_content(text.render(ctx))
            if html is not None:
                msg.add_alternative(html.render(ctx), subtype="html")
        elif html is not None:
            msg.set_content(html.render(ctx), subtype="html")
        else:
            msg.set_content(self.parts["amp_html_body"].render(ctx), subtype="html")  # type: ignore[union-attr]
        _attach(msg, b.inline, inline=True)
        _attach(msg, b.attachments, inline=False)
        return msg.as_bytes()


def _attach(msg: EmailMessage, items: Iterable[InjectAttachment], inline: bool) -> None:
    for att in items:
        data = base64.b64decode(att.data) if att.base64 else att.data.encode("utf-8")
        maintype, _, subtype = att.content_type.partition("/")
        headers = {}
        if att.content_id:
            headers["Content-ID"] = f"<{att.content_id}>"
        msg.add_attachment(data, maintype=maintype or "application",
                           subtype=subtype or "octet-stream", filename=att.file_name,
                           disposition="inline" if inline else "attachment")
        if att.content_id:
            msg.get_payload()[-1]["Content-ID"] = f"<{att.content_id}>"


def check_recipient(email: str) -> str | None:
    """None if ``email`` can be used, else why not."""
    try:
        split_address(email)
    except AddressError as exc:
        return str(exc)
    return None
