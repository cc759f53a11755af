"""Who may call an HTTP endpoint: the one place the HTTP adapters check tokens, through the store's comparator."""

from __future__ import annotations

from typing import Any

from litestar import Request, WebSocket
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.types import Scope

from .core.protocol import Role
from .tokens import Grant, TokenStore

__all__ = ["bearer_allowed", "require_token", "token_store"]


def token_store(connection: Request[Any, Any, Any] | WebSocket[Any, Any, Any]) -> TokenStore:
    return connection.app.state.token_store


def require_token(request: Request[Any, Any, Any], *, allow_controller: bool) -> Grant:
    """The admin (or controller) grant of the request's X-Auth-Token; 401 without one, 403 for another role."""
    presented = request.headers.get("x-auth-token")
    if not presented:
        raise NotAuthorizedException("X-Auth-Token header required")
    grant = token_store(request).lookup(presented)
    allowed = (Role.ADMIN, Role.CONTROLLER) if allow_controller else (Role.ADMIN,)
    if grant is None or grant.role not in allowed:
        raise PermissionDeniedException("token not allowed here")
    return grant


def bearer_allowed(scope: Scope, store: TokenStore) -> bool:
    """``Authorization: Bearer <token>`` with a controller or admin token, through the store's comparator."""
    headers = dict(scope.get("headers") or [])
    value = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, presented = value.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return False
    grant = store.lookup(presented)
    return grant is not None and grant.role in (Role.CONTROLLER, Role.ADMIN)
