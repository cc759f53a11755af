"""The ban list over HTTP (``/api/v1/bans``), admin token only: list, ban, lift, through appliance/bans.py.

The same service as the dashboard's Bans page: a ban is stored cluster-wide, closes what it
covers (4016) and is audited (``ban.add``, ``ban.lift``, ``via=api``). Errors have the API's
shape, ``{"error": ..., "detail": ...}``: 422 ``invalid_ban`` (an invalid request is 422 across the API,
appliance/api_schema.py), 404 ``no_ban``, 503 ``broker_unavailable``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from litestar import Request, Response, delete, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromQuery, JSONBody
from msgspec import Meta, Struct

from .api_schema import AUTH_ERRORS, ApiOperation, JsonBodyOperation, options_handlers, refuse_repeated_query
from .brokers.base import BrokerUnavailable
from .core.bans import BAN_SECONDS_MAX, Ban, parse_target
from .core.protocol import ErrorCode
from .http_auth import require_token

__all__ = ["BAN_HANDLERS"]


class BanBody(Struct, forbid_unknown_fields=True):
    """A ban to add: what, for how long, and why."""

    target: Annotated[
        str,
        Meta(description="A client id, an IP address or a CIDR block (at most /8, IPv6 /32).", examples=["kiosk-7"]),
    ]
    seconds: Annotated[int, Meta(ge=60, le=BAN_SECONDS_MAX, description="How long the ban lasts.", examples=[3600])]
    reason: Annotated[str, Meta(max_length=200, description="Kept in the ban and the audit trail.")] = ""


class BanRecord(Struct):
    key: Annotated[str, Meta(description="``id:<id>`` or ``address:<network>``: what DELETE takes as ``key``.")]
    kind: Annotated[str, Meta(description="id or address")]
    target: str
    until: Annotated[float, Meta(description="Epoch seconds.")]
    by: Annotated[str, Meta(description="The token name that banned.")]
    reason: str
    at: Annotated[float, Meta(description="Epoch seconds.")]
    closed: Annotated[int | None, Meta(description="Connections the new ban closed (POST only).")] = None


class BanList(Struct):
    bans: list[BanRecord]


class BanError(Struct):
    error: Annotated[str, Meta(description="invalid_ban, no_ban or broker_unavailable")]
    detail: str


def _answer(description: str) -> ResponseSpec:
    return ResponseSpec(BanError, description=description, generate_examples=False)


_UNAVAILABLE = _answer("broker_unavailable: Redis cannot be reached.")
_INVALID = _answer("invalid_ban: neither a client id nor an address, or a block wider than /8 (IPv6 /32).")
#: What the OpenAPI document says beyond Litestar's inference (appliance/api_schema.py).
_DOCUMENTED: dict[str, Any] = {"raises": AUTH_ERRORS, "before_request": refuse_repeated_query}


def _record(ban: Ban, closed: int | None = None) -> BanRecord:
    return BanRecord(ban.key, ban.kind, ban.target, ban.until, ban.by, ban.reason, ban.at, closed)


def _error(status: int, error: str, detail: str) -> Response[Any]:
    return Response({"error": error, "detail": detail}, status_code=status)


def _source(request: Request[Any, Any, Any]) -> str:
    return request.client.host if request.client else "unknown"


@get(
    "/api/v1/bans",
    summary="The live bans (admin token only)",
    tags=["bans"],
    responses={503: _UNAVAILABLE},
    operation_class=ApiOperation,
    **_DOCUMENTED,
)
async def list_bans(request: Request[Any, Any, Any]) -> Response[BanList]:
    require_token(request, allow_controller=False)
    try:
        bans = (await request.app.state.bans.current()).live(time.time())
    except BrokerUnavailable as exc:
        return _error(503, ErrorCode.BROKER_UNAVAILABLE.value, str(exc))
    return Response(BanList([_record(ban) for ban in bans]))


@post(
    "/api/v1/bans",
    summary="Ban a client id or an address (admin token only; closes it with 4016)",
    tags=["bans"],
    responses={422: _INVALID, 503: _UNAVAILABLE},
    operation_class=JsonBodyOperation,
    **_DOCUMENTED,
)
async def add_ban(request: Request[Any, Any, Any], data: JSONBody[BanBody]) -> Response[BanRecord]:
    grant = require_token(request, allow_controller=False)
    try:
        ban, closed = await request.app.state.bans.ban(
            data.target, data.seconds, grant.name, _source(request), data.reason, via="api"
        )
    except ValueError as exc:
        return _error(422, "invalid_ban", str(exc))
    except BrokerUnavailable as exc:
        return _error(503, ErrorCode.BROKER_UNAVAILABLE.value, str(exc))
    return Response(_record(ban, closed), status_code=201)


@delete(
    "/api/v1/bans",
    status_code=204,
    summary="Lift a ban (admin token only)",
    tags=["bans"],
    responses={404: _answer("no_ban: nothing banned by that target."), 422: _INVALID, 503: _UNAVAILABLE},
    operation_class=ApiOperation,
    **_DOCUMENTED,
)
async def lift_ban(request: Request[Any, Any, Any], target: FromQuery[str]) -> Response[None]:
    """``target``: the banned client id, address or block, as given or as listed (``key``)."""
    grant = require_token(request, allow_controller=False)
    try:
        kind, normal = parse_target(target.split(":", 1)[1] if target.startswith(("id:", "address:")) else target)
        lifted = await request.app.state.bans.lift(f"{kind}:{normal}", grant.name, _source(request), via="api")
    except ValueError as exc:
        return _error(422, "invalid_ban", str(exc))
    except BrokerUnavailable as exc:
        return _error(503, ErrorCode.BROKER_UNAVAILABLE.value, str(exc))
    if not lifted:
        return _error(404, "no_ban", f"{target[:60]} is not banned")
    return Response(None, status_code=204)


BAN_HANDLERS = [list_bans, add_ban, lift_ban]
BAN_HANDLERS[:0] = options_handlers(BAN_HANDLERS)  # OPTIONS lists GET, POST and DELETE (api_schema.py)
