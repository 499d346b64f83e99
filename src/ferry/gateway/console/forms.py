"""HTML form bodies (application/x-www-form-urlencoded) read without a multipart parser.

The console's forms are all small and urlencoded, so the standard library is enough; what a field
means is checked by the admin API's own functions (``admin.key_spec``), not here.
"""

from __future__ import annotations

import math
from urllib.parse import parse_qs

from starlette.requests import Request

MAX_FORM_BYTES = 64 * 1024


class FormError(Exception):
    """A body that is not a console form; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_form(request: Request) -> dict[str, str]:
    """The form's fields (the last value of each), or FormError."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise FormError(415, "expected an application/x-www-form-urlencoded form")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FormError(413, f"form larger than {MAX_FORM_BYTES} bytes")
    try:
        fields = parse_qs(body.decode(), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError as e:
        raise FormError(400, "form is not UTF-8") from e
    return {k: v[-1] for k, v in fields.items()}


def _number(text: str) -> object:
    """A form's number as the JSON API would carry it: int, float, or the text itself for the
    admin API's checks to refuse with their own message ("rpm: must be a positive integer")."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return text
    # NOTE: "nan" and "inf" parse as floats, yet no budget can be either; as text, they are refused.
    return value if math.isfinite(value) else text


def key_settings(form: dict[str, str], fields: tuple[str, ...]) -> dict[str, object]:
    """The key form's ``fields`` as the admin API's JSON body would have them: a blank field is
    null (no limit, every model, the default class); models are a comma-separated list."""
    out: dict[str, object] = {}
    for name in fields:
        text = form.get(name, "").strip()
        if not text:
            out[name] = None
        elif name == "models":
            out[name] = [m.strip() for m in text.split(",") if m.strip()]
        elif name in ("budget_usd", "rpm", "tpm"):
            out[name] = _number(text)
        else:
            out[name] = text
    return out
