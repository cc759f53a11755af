"""Dashboard actions: send a command, disconnect clients, rotate and revoke tokens.

Each goes through the appliance's own services, never around them: the command service on
``app.state.commands`` (the one behind ``POST /api/v1/commands``; no side connection) and the
token service on ``app.state.token_service``. A page whose service is not in this build is
not offered (404). Every action needs an admin session (the viewer token gets 403), a CSRF
token, and is recorded in the audit trail with the actor's token name and address; an
injected message is recorded as its hash only.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

from jinja2_fragments.litestar import HTMXBlockTemplate
from litestar import Request, Response, get, post
from litestar.exceptions import NotFoundException
from litestar.params import FromQuery
from litestar.plugins.htmx import HTMXRequest
from litestar.response import Template
from litestar.status_codes import HTTP_400_BAD_REQUEST, HTTP_409_CONFLICT

from appliance.audit import message_digest
from appliance.brokers.base import BrokerUnavailable
from appliance.core.recent import cut

from .auth import principal_of, require_admin, require_session
from .pages import PREFIX, _audit, _common, _records, _remote
from .query import ClientQuery

__all__ = ["ACTION_ROUTES", "DISCONNECT_CODE", "HISTORY_LENGTH"]

#: Close code of an administrator's disconnect (docs/protocol.md: 4012 DISCONNECTED).
DISCONNECT_CODE = 4012
#: Commands kept in a session's history (with their text, for resend).
HISTORY_LENGTH = 20
#: Longer messages and replies are shown cut; longer messages are not kept for resend.
KEEP_CHARS = 4096
#: Disconnecting more than this many connections at once is refused (narrow the filter).
BULK_LIMIT = 1000


def _commands(request: Request) -> Any:
    commands = getattr(request.app.state, "commands", None)
    if commands is None:
        raise NotFoundException("this build has no command service")
    return commands


def _token_service(request: Request) -> Any:
    service = getattr(request.app.state, "token_service", None)
    if service is None:
        raise NotFoundException("this build has no token service")
    return service


def _session(request: Request) -> Any:
    session = request.scope.get("session")
    return session if isinstance(session, dict) else {}


def _cut(text: Any) -> str:
    return cut("" if text is None else str(text), KEEP_CHARS)


# --- send ------------------------------------------------------------------------------------------


def _target_of(kind: str, value: str) -> str | None:
    value = value.strip()
    if kind == "everyone":
        return "*"
    if kind == "group":
        return f"group:{value}" if value else None
    return value or None


@get("/send", guards=[require_session])
async def send_page(request: HTMXRequest, target: FromQuery[str] = "", kind: FromQuery[str] = "client") -> Template:
    _commands(request)
    history = list(_session(request).get("sent", []))
    return Template(
        "send.html",
        context=_common(request, history=history, ids=[], target=target, kind=kind, result=None, form={}),
    )


#: Target suggestions offered at once (the datalist asks again as the operator types).
SUGGESTIONS = 50


@get("/send/targets", guards=[require_session])
async def send_targets(request: HTMXRequest, target: FromQuery[str] = "", kind: FromQuery[str] = "client") -> Template:
    """Ids (or groups) that contain what was typed, any case: asked as the operator types, so every
    client of a large cluster can be found, not only the first few hundred."""
    _commands(request)
    records, _ = await _records(request)
    needle = target.strip()[:200].casefold()
    if kind == "group":
        names = {str(g) for r in records if r.get("role") == "client" for g in (r.get("groups") or [])}
    else:
        names = {str(r["id"]) for r in records if r.get("role") == "client"}
    found = sorted(n for n in names if needle in n.casefold())
    return HTMXBlockTemplate(
        template_name="send.html", block_name="suggestions", context=_common(request, ids=found[:SUGGESTIONS])
    )


@post("/send", guards=[require_admin])
async def send(request: HTMXRequest) -> Response[Any]:
    """Send through the command service and answer with the resolved row (and the pending row's id)."""
    commands = _commands(request)
    form = await request.form()
    kind = str(form.get("kind") or "client")
    target = _target_of(kind, str(form.get("target") or ""))
    message = str(form.get("message") or "")
    try:
        wait_s = float(form.get("wait") or 0)
    except ValueError:
        wait_s = -1
    queue = form.get("queue") == "on"
    pending_id = str(request.headers.get("x-pending-row") or "")[:40]
    if target is None or not message or not 0 <= wait_s <= 300:
        invalid = {
            "at": time.time(),
            "target": target or "",
            "message": None,
            "preview": _cut(message),
            "status": "invalid",
            "detail": "choose a target, type a message, and wait 0 to 300 s",
            "reply": "",
            "sender": "",
            "rtt_ms": None,
        }
        return _send_result(request, invalid, pending_id, status_code=HTTP_400_BAD_REQUEST)
    started = time.perf_counter()
    wait_ms = round(wait_s * 1000) if wait_s > 0 else None
    try:
        outcome = await commands.send_command(target, message, wait_ms=wait_ms, queue=queue, controller="dashboard")
        status_code, body = outcome.http_status, dict(outcome.body)
    except BrokerUnavailable as exc:
        status_code, body = 503, {"error": "broker_unavailable", "detail": str(exc)}
    elapsed_ms = (time.perf_counter() - started) * 1000
    entry: dict[str, Any] = {
        "at": time.time(),
        "target": target,
        "message": message if len(message) <= KEEP_CHARS else None,
        "preview": _cut(message),
        "wait": wait_s,
        "queue": queue,
        "http_status": status_code,
        "status": str(body.get("status") or body.get("error") or status_code),
        "reply": _cut(body.get("message")) if body.get("status") == "replied" else "",
        "sender": str(body.get("sender") or ""),
        "detail": _cut(body.get("detail")),
        # A round trip only where there was one (a reply): an offline target or a delivery has none.
        "rtt_ms": body.get("rtt_ms")
        if body.get("rtt_ms") is not None
        else (round(elapsed_ms, 1) if body.get("status") == "replied" and "replies" not in body else None),
        # A group or everyone: how many clients received it, cluster-wide.
        "count": body.get("count"),
        **_broadcast_replies(body),
    }
    session = request.scope.get("session")
    if isinstance(session, dict):
        session["sent"] = [entry, *session.get("sent", [])][:HISTORY_LENGTH]
    principal = principal_of(request)
    await _audit(
        request,
        "command.send",
        principal.name,
        target,
        message=message_digest(message),
        status=entry["status"],
        rtt_ms=entry["rtt_ms"],
    )
    return _send_result(request, entry, pending_id)


#: Replies per client kept with one sent broadcast (the rest are counted, not shown).
BROADCAST_REPLIES_SHOWN = 50


def _broadcast_replies(body: dict[str, Any]) -> dict[str, Any]:
    """A waited broadcast's replies per client (cut) and the clients that did not answer in time."""
    if "replies" not in body:
        return {}
    replies = [
        {"client": str(r.get("client")), "message": _cut(r.get("message")), "rtt_ms": r.get("rtt_ms")}
        for r in body["replies"][:BROADCAST_REPLIES_SHOWN]
    ]
    silent = [str(c) for c in body.get("no_reply") or []]
    return {
        "replies": replies,
        "replies_total": len(body["replies"]),
        "no_reply": silent[:BROADCAST_REPLIES_SHOWN],
        "no_reply_total": len(silent),
    }


def _send_result(request: HTMXRequest, entry: dict[str, Any], pending_id: str, status_code: int = 200) -> Response[Any]:
    if request.htmx:  # Always swapped: the row itself says what went wrong.
        return Template("send_row.html", context=_common(request, entry=entry, pending_id=pending_id))
    history = list(_session(request).get("sent", []))
    return Template(
        "send.html",
        context=_common(request, history=history, ids=[], target="", kind="client", result=entry, form={}),
        status_code=status_code,
    )


# --- disconnect --------------------------------------------------------------------------------------


async def _disconnect(request: Request, client_ids: list[str], reason: str) -> tuple[int, int]:
    commands = _commands(request)
    principal = principal_of(request)
    closed = missing = 0
    for client_id in client_ids:
        if await commands.disconnect(client_id, DISCONNECT_CODE):
            closed += 1
            await _audit(request, "client.disconnect", principal.name, client_id, code=DISCONNECT_CODE, how=reason)
        else:
            missing += 1
    return closed, missing


def _action_error(request: HTMXRequest, text: str, status_code: int, back: str) -> Template:
    """An action refused: the message in the page, where the action's own result would appear.

    htmx swaps it like a result (dashboard.js swaps HTML error answers into their target).
    """
    if request.htmx:
        return Template("result.html", context=_common(request, text=text, error=True), status_code=status_code)
    return Template(
        "result.html", context=_common(request, text=text, error=True, back=back, full=True), status_code=status_code
    )


def _disconnect_result(request: HTMXRequest, closed: int, missing: int, back: str) -> Response[Any]:
    text = f"Disconnected {closed} connection{'s' if closed != 1 else ''} (close code {DISCONNECT_CODE})."
    if missing:
        text += f" {missing} {'was' if missing == 1 else 'were'} no longer connected."
    if request.htmx:
        # The table refreshes at once: its ticked rows would otherwise keep live updates paused.
        return Template("result.html", context=_common(request, text=text), headers={"HX-Trigger": "refresh"})
    return Template("result.html", context=_common(request, text=text, back=back, full=True))


@post("/client/disconnect", guards=[require_admin])
async def disconnect_one(request: HTMXRequest) -> Response[Any]:
    client_id = str((await request.form()).get("id") or "")
    if not client_id:
        return _action_error(request, "No client id given.", HTTP_400_BAD_REQUEST, f"{PREFIX}/clients")
    closed, missing = await _disconnect(request, [client_id], "one")
    return _disconnect_result(request, closed, missing, f"{PREFIX}/client?{urlencode({'id': client_id})}")


@post("/clients/disconnect", guards=[require_admin])
async def disconnect_many(request: HTMXRequest) -> Response[Any]:
    """The ticked rows, or every connection matching the filter (e.g. everyone on token version N)."""
    form = await request.form()
    if form.get("scope") == "matching":
        params = {k: str(v) for k, v in form.items() if k in ("q", "role", "instance", "group", "token_version")}
        params["limit"] = "200"
        records, _ = await _records(request)
        query = ClientQuery.from_params(params)
        # Controllers (the LLM side) go only when asked for: ticked, or the filter names their role.
        controllers = form.get("controllers") == "on" or query.role == "controller"
        ids = sorted({r["id"] for r in records if query.matches(r) and (controllers or r.get("role") == "client")})
        how = "matching " + ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if v and k != "limit")
        if controllers:
            how += " with controllers"
    else:
        # getall without a default raises KeyError when no box is ticked.
        ids = sorted({str(v) for v in form.getall("id", [])})
        how = "selection"
    back = f"{PREFIX}/clients"
    if not ids:
        text = "Nothing to disconnect: tick the connections first." if how == "selection" else "No connection matches."
        return _action_error(request, text, HTTP_400_BAD_REQUEST, back)
    if len(ids) > BULK_LIMIT:
        text = f"Not disconnected: {len(ids)} connections match; narrow the filter to {BULK_LIMIT} or fewer."
        return _action_error(request, text, HTTP_409_CONFLICT, back)
    if how != "selection" and str(form.get("confirm") or "").strip() != str(len(ids)):
        # Typed, not a click on confirm(): the operator says how many connections go.
        text = f"Not disconnected: {len(ids)} connection{'s' if len(ids) != 1 else ''} match now; type {len(ids)} to confirm."
        return _action_error(request, text, HTTP_400_BAD_REQUEST, back)
    closed, missing = await _disconnect(request, ids, how)
    return _disconnect_result(request, closed, missing, back)


# --- tokens ----------------------------------------------------------------------------------------


@get("/tokens", guards=[require_session])
async def tokens_page(request: HTMXRequest) -> Template:
    service = _token_service(request)
    context = _common(request, tokens=await service.cluster_status(), shown=None, urlencode=urlencode)
    return Template("tokens.html", context={**context, "unrotatable": service.rotation_unavailable()})


async def _token_action(request: HTMXRequest) -> tuple[Any, str, dict[str, Any]]:
    service = _token_service(request)
    form = await request.form()
    name = str(form.get("name") or "")
    known = {entry["name"] for entry in service.status()}
    if name not in known:
        raise NotFoundException(f"no token named {name[:60]!r}")
    return service, name, dict(form)


def _token_result(
    request: HTMXRequest, tokens: list[dict[str, Any]], shown: Any, error: str, status: int = 200
) -> Template:
    template = "tokens.html"
    context = _common(request, tokens=tokens, shown=shown, error=error, urlencode=urlencode)
    context["unrotatable"] = _token_service(request).rotation_unavailable()
    if request.htmx:
        return HTMXBlockTemplate(template_name=template, block_name="panel", context=context, status_code=status)
    return Template(template, context=context, status_code=status)


@post("/tokens/rotate", guards=[require_admin])
async def rotate_token(request: HTMXRequest) -> Template:
    """Typed confirmation: the operator types the token's name. The new value is shown once, here."""
    service, name, form = await _token_action(request)
    if str(form.get("confirm") or "").strip() != name:
        return _token_result(
            request, await service.cluster_status(), None, f"Type {name} to confirm the rotation.", 400
        )
    principal = principal_of(request)
    keep = form.get("keep_connections") == "on"  # As the CLI's --keep-connections.
    try:
        value = await service.rotate(name, principal.name, _remote(request), keep_connections=keep)
    except Exception as exc:  # RotationUnavailable, TokenStoreError: say why, change nothing.
        return _token_result(request, await service.cluster_status(), None, str(exc), 409)
    shown = {"name": name, "value": value}
    return _token_result(request, await service.cluster_status(), shown, "")


@post("/tokens/revoke", guards=[require_admin])
async def revoke_token(request: HTMXRequest) -> Template:
    """End the grace window now: the previous version stops working and its connections close (4011)."""
    service, name, _ = await _token_action(request)
    principal = principal_of(request)
    try:
        await service.revoke(name, principal.name, _remote(request))
    except Exception as exc:
        return _token_result(request, await service.cluster_status(), None, str(exc), 409)
    return _token_result(request, await service.cluster_status(), None, "")


ACTION_ROUTES = [
    send_page,
    send_targets,
    send,
    disconnect_one,
    disconnect_many,
    tokens_page,
    rotate_token,
    revoke_token,
]
