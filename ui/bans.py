"""The Bans page: list, add and lift bans (admin sessions only), through the ban service on ``app.state.bans``.

A ban refuses an id, an address or a CIDR block at every instance's handshake (4016) for a
duration and closes what it covers now (appliance/bans.py). Adding and lifting need a CSRF
token and are audited (``ban.add``, ``ban.lift``) with the operator's token name; a refused
request (a target that is neither an id nor an address, Redis unreachable) says why in the
page, where the list would be.
"""

from __future__ import annotations

import time
from typing import Any

from jinja2_fragments.litestar import HTMXBlockTemplate
from litestar import Request, get, post
from litestar.exceptions import NotFoundException
from litestar.plugins.htmx import HTMXRequest
from litestar.response import Template
from litestar.status_codes import HTTP_400_BAD_REQUEST, HTTP_404_NOT_FOUND, HTTP_503_SERVICE_UNAVAILABLE

from appliance.brokers.base import BrokerUnavailable

from .auth import principal_of, require_admin
from .pages import _common, _remote

__all__ = ["BAN_DURATIONS", "BAN_ROUTES"]

#: The durations offered, in seconds, with their labels (the API takes any from 60 s to a year).
BAN_DURATIONS = [
    (900, "15 minutes"),
    (3600, "1 hour"),
    (86400, "1 day"),
    (7 * 86400, "7 days"),
    (30 * 86400, "30 days"),
]


def _service(request: Request) -> Any:
    service = getattr(request.app.state, "bans", None)
    if service is None:
        raise NotFoundException("this build has no ban list")
    return service


async def _panel(
    request: HTMXRequest, *, error: str = "", done: str = "", status: int = 200, prefill: str = ""
) -> Template:
    """The page, or for htmx its panel: the live bans and the outcome of the action just taken."""
    bans: list[Any] = []
    try:
        bans = (await _service(request).current()).live(time.time())
    except BrokerUnavailable as exc:
        error, status = error or f"The ban list cannot be read now: {exc}.", HTTP_503_SERVICE_UNAVAILABLE
    context = _common(request, bans=bans, durations=BAN_DURATIONS, error=error, done=done, prefill=prefill)
    if request.htmx:
        return HTMXBlockTemplate(template_name="bans.html", block_name="panel", context=context, status_code=status)
    return Template("bans.html", context=context, status_code=status)


@get("/bans", guards=[require_admin])
async def bans_page(request: HTMXRequest) -> Template:
    """The list; ``?target=`` fills the form in (the client page links here to ban its id)."""
    return await _panel(request, prefill=str(request.query_params.get("target") or "")[:60])


@post("/bans", guards=[require_admin])
async def add_ban(request: HTMXRequest) -> Template:
    form = await request.form()
    target = str(form.get("target") or "").strip()
    if not target:
        return await _panel(request, error="Type a client id, an IP address or a CIDR block to ban.", status=400)
    try:
        seconds = float(str(form.get("seconds") or ""))
    except ValueError:
        return await _panel(request, error="Choose how long the ban lasts.", status=HTTP_400_BAD_REQUEST)
    reason = str(form.get("reason") or "")
    try:
        ban, closed = await _service(request).ban(target, seconds, principal_of(request).name, _remote(request), reason)
    except ValueError as exc:
        return await _panel(request, error=f"Not banned: {exc}.", status=HTTP_400_BAD_REQUEST)
    except BrokerUnavailable as exc:
        return await _panel(request, error=f"Not banned: {exc}.", status=HTTP_503_SERVICE_UNAVAILABLE)
    done = f"Banned {ban.shown_target()}; {closed} connection{'s' if closed != 1 else ''} closed (close code 4016)."
    return await _panel(request, done=done)


@post("/bans/lift", guards=[require_admin])
async def lift_ban(request: HTMXRequest) -> Template:
    key = str((await request.form()).get("key") or "")
    try:
        lifted = await _service(request).lift(key, principal_of(request).name, _remote(request))
    except BrokerUnavailable as exc:
        return await _panel(request, error=f"Not lifted: {exc}.", status=HTTP_503_SERVICE_UNAVAILABLE)
    if not lifted:
        return await _panel(
            request, error="No such ban: it has ended or was lifted already.", status=HTTP_404_NOT_FOUND
        )
    return await _panel(request, done=f"Lifted the ban on {key.split(':', 1)[-1]}.")


BAN_ROUTES = [bans_page, add_ban, lift_ban]
