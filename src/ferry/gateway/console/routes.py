"""The console's routes under /ui: login, the read-mostly pages, the keys' forms, the static files.

Every page needs a session (``guard.Guard``); every POST its CSRF token. Key changes go through the
admin API's own checks (``admin.key_spec``) and the same ``KeyStore`` calls.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response, StreamingResponse

from ferry.gateway.admin import KeySpecError, key_spec
from ferry.gateway.console import queries
from ferry.gateway.console.forms import key_settings
from ferry.gateway.console.guard import CSRF_FIELD, LOGIN_PATH, Guard
from ferry.gateway.console.live import backend_views, database_view
from ferry.gateway.console.render import SECURITY_HEADERS, Renderer, json_script
from ferry.gateway.console.sessions import (
    LOGIN_COOKIE,
    LOGIN_TOKEN_AGE_S,
    MAX_AGE_S,
    SESSION_COOKIE,
    Session,
    clear_cookie,
    set_cookie,
)
from ferry.gateway.keys import KeySpec
from ferry.gateway.ledger import GROUP_BY
from ferry.gateway.state import Gateway
from ferry.openai_errors import OpenAIError

log = logging.getLogger("ferry.gateway")

KEY_FIELDS = tuple(f.name for f in dataclasses.fields(KeySpec))
LIMIT_FIELDS = ("budget_usd", "rpm", "tpm")  # what the keys table's inline form changes
USAGE_GROUPS = ("key", "team", "backend")
assert set(USAGE_GROUPS) <= set(GROUP_BY)


def console_router(gw: Gateway) -> APIRouter:
    """The console for one gateway; its sessions live as long as this router (the app)."""
    router = APIRouter(prefix="/ui", include_in_schema=False)
    guard = Guard()
    render = Renderer()

    def page(template: str, session: Session, status: int = 200, **context: Any) -> Response:
        return render.page(template, status, csrf=session.csrf, csrf_field=CSRF_FIELD, **context)

    def failed(session: Session, e: OpenAIError) -> Response:
        """A database outage (or a bad filter) as a page, not as the API's JSON."""
        return page("error.html", session, status=e.status_code, title="Error", nav="", message=e.message)

    # -- login ---------------------------------------------------------------------------------

    def login_page(request: Request, error: str | None = None, status: int = 200) -> Response:
        token = secrets.token_urlsafe(32)
        resp = render.page("login.html", status, token=token, csrf_field=CSRF_FIELD, error=error, title="Log in")
        set_cookie(resp, request, LOGIN_COOKIE, token, LOGIN_TOKEN_AGE_S)
        return resp

    @router.get("/login")
    async def login(request: Request) -> Response:
        if guard.session(request) is not None:
            return RedirectResponse("/ui", status_code=303, headers=SECURITY_HEADERS)
        return login_page(request)

    @router.post("/login")
    async def do_login(request: Request) -> Response:
        form = await guard.login_form(request)
        if isinstance(form, Response):
            return form
        if not gw.is_master(form.get("master_key") or None):
            log.warning("console: failed login from %s", request.client.host if request.client else "?")
            return login_page(request, "That is not the gateway's master key.", status=401)
        session_id, _ = guard.sessions.create()
        resp = RedirectResponse("/ui", status_code=303, headers=SECURITY_HEADERS)
        set_cookie(resp, request, SESSION_COOKIE, session_id, MAX_AGE_S)
        clear_cookie(resp, request, LOGIN_COOKIE)
        return resp

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        got = await guard.post(request)
        if isinstance(got, Response):
            return got
        guard.sessions.drop(request.cookies.get(SESSION_COOKIE))
        resp = RedirectResponse(LOGIN_PATH, status_code=303, headers=SECURITY_HEADERS)
        clear_cookie(resp, request, SESSION_COOKIE)
        return resp

    # -- backends ------------------------------------------------------------------------------

    @router.get("")
    async def backends(request: Request) -> Response:
        session = guard.page(request)
        if isinstance(session, Response):
            return session
        return page("backends.html", session, title="Backends", nav="backends", backends=backend_views(gw),
                    database=database_view(gw))

    @router.get("/fragments/backends")
    async def backends_fragment(request: Request) -> Response:
        session = guard.page(request)
        if isinstance(session, Response):
            return session
        return render.page("_backends.html", backends=backend_views(gw), database=database_view(gw))

    # -- traffic: overflow share and data-class decisions over time -----------------------------

    @router.get("/traffic")
    async def traffic(request: Request, period: str = "24h") -> Response:
        session = guard.page(request)
        if isinstance(session, Response):
            return session
        if period not in queries.CHART_PERIODS:
            period = "24h"
        try:
            tl = await gw.db(queries.timeline, gw.engine, period)
            decisions = await gw.db(queries.data_class_decisions, gw.engine, queries.period_start(period))
        except OpenAIError as e:
            return failed(session, e)
        for row in decisions:
            row["share"] = queries.overflow_share(row)
        return page("traffic.html", session, title="Traffic", nav="traffic", period=period,
                    periods=queries.CHART_PERIODS, chart=json_script(tl.chart()), decisions=decisions)

    # -- usage: spend and tokens by key, team and backend ----------------------------------------

    @router.get("/usage")
    async def usage(request: Request, period: str = "24h") -> Response:
        session = guard.page(request)
        if isinstance(session, Response):
            return session
        if period not in queries.PERIODS:
            period = "24h"
        since = queries.period_start(period)
        try:
            groups = {g: await gw.db(gw.ledger.usage, g, since) for g in USAGE_GROUPS}
        except OpenAIError as e:
            return failed(session, e)
        charts = {g: json_script({"labels": [str(r["group"]) for r in rows],
                                  "values": [round(r["cost_usd"], 6) for r in rows]})
                  for g, rows in groups.items()}
        return page("usage.html", session, title="Usage", nav="usage", period=period, periods=list(queries.PERIODS),
                    groups=groups, charts=charts)

    # -- ledger ----------------------------------------------------------------------------------

    def ledger_request(request: Request) -> tuple[Session, queries.LedgerFilter] | Response:
        """The session and the ledger filter a ledger page asks for, or the page that says why not."""
        session = guard.page(request)
        if isinstance(session, Response):
            return session
        try:
            return session, queries.LedgerFilter.from_query(request.query_params)
        except ValueError as e:
            return failed(session, OpenAIError(400, str(e)))

    @router.get("/ledger")
    async def ledger(request: Request) -> Response:
        asked = ledger_request(request)
        if isinstance(asked, Response):
            return asked
        session, f = asked
        try:
            rows = await gw.db(queries.ledger_page, gw.engine, f)
            keys = await gw.db(gw.keys.list)
        except OpenAIError as e:
            return failed(session, e)
        older = f.query_string(before=rows[-1]["id"]) if len(rows) == queries.PAGE_SIZE else None
        return page("ledger.html", session, title="Ledger", nav="ledger", f=f, rows=rows, older=older,
                    csv_query=f.query_string(before=""), periods=list(queries.PERIODS),
                    statuses=queries.STATUSES[1:], key_names=sorted({k.name for k in keys}),
                    teams=sorted({t.name for t in gw.config.teams} | {k.team for k in keys if k.team}),
                    backend_names=list(gw.backends))

    @router.get("/ledger.csv")
    async def ledger_csv(request: Request) -> Response:
        asked = ledger_request(request)
        if isinstance(asked, Response):
            return asked
        _, f = asked
        headers = {**SECURITY_HEADERS, "Content-Disposition": 'attachment; filename="ferry-ledger.csv"'}
        # NOTE: a sync generator: Starlette iterates it in a worker thread, off the event loop.
        return StreamingResponse(queries.ledger_csv(gw.engine, f), media_type="text/csv; charset=utf-8",
                                 headers=headers)

    # -- keys ------------------------------------------------------------------------------------

    async def keys_page(session: Session, status: int = 200, **context: Any) -> Response:
        try:
            keys = await gw.db(gw.keys.list)
            spent = await gw.db(queries.spend_by_key, gw.engine)
        except OpenAIError as e:
            return failed(session, e)
        context.setdefault("form", {})
        return page("keys.html", session, status=status, title="Keys", nav="keys", keys=keys, spent=spent,
                    models=[m.name for m in gw.config.models],
                    data_classes=[c.name for c in gw.config.data_classes],
                    default_data_class=gw.config.default_data_class, **context)

    @router.get("/keys")
    async def keys(request: Request) -> Response:
        session = guard.page(request)
        if isinstance(session, Response):
            return session
        return await keys_page(session)

    @router.post("/keys")
    async def create_key(request: Request) -> Response:
        got = await guard.post(request)
        if isinstance(got, Response):
            return got
        session, form = got
        try:
            spec = key_spec(gw, key_settings(form, KEY_FIELDS))
            record, secret = await gw.db(gw.keys.create, spec)
        except KeySpecError as e:
            return await keys_page(session, status=400, error=str(e), form=form)
        except OpenAIError as e:
            return failed(session, e)
        log.info("console: key %s (%s) created", record.id, record.name)
        return await keys_page(session, status=201, created=record, secret=secret)

    @router.post("/keys/{key_id}")
    async def update_key(key_id: str, request: Request) -> Response:
        got = await guard.post(request)
        if isinstance(got, Response):
            return got
        session, form = got
        try:
            record = await gw.db(gw.keys.get, key_id)
            if record is None:
                return await keys_page(session, status=404, error=f"no key with id {key_id!r}")
            spec = key_spec(gw, key_settings(form, LIMIT_FIELDS), base=record)
            updated = await gw.db(gw.keys.update, key_id, spec)
        except KeySpecError as e:
            return await keys_page(session, status=400, error=f"key {key_id}: {e}")
        except OpenAIError as e:
            return failed(session, e)
        if updated is None:
            return await keys_page(session, status=404, error=f"no key with id {key_id!r}")
        log.info("console: key %s (%s) limits set", key_id, updated.name)
        return await keys_page(session, notice=f"Key {updated.name!r}: budget and limits saved.")

    @router.post("/keys/{key_id}/revoke")
    async def revoke_key(key_id: str, request: Request) -> Response:
        got = await guard.post(request)
        if isinstance(got, Response):
            return got
        session, _ = got
        try:
            record = await gw.db(gw.keys.get, key_id)
            deleted = record is not None and await gw.db(gw.keys.delete, key_id)
        except OpenAIError as e:
            return failed(session, e)
        if not deleted or record is None:
            return await keys_page(session, status=404, error=f"no key with id {key_id!r}")
        log.info("console: key %s (%s) revoked", key_id, record.name)
        return await keys_page(session, notice=f"Key {record.name!r} revoked: it is refused from now on.")

    # -- static files ----------------------------------------------------------------------------

    @router.get("/static/{name}")
    async def static(name: str, request: Request) -> Response:
        return render.static(name, request.headers.get("if-none-match"))

    return router
