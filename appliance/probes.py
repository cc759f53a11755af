"""The small HTTP endpoints around the relay: ``/``, ``/healthz``, ``/readyz`` and ``/metrics``."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_503_SERVICE_UNAVAILABLE

from . import __version__, metrics
from .api_schema import PublicOperation
from .http_auth import token_store
from .relay import Relay

__all__ = ["PROBE_HANDLERS"]


def _relay(request: Request[Any, Any, Any]) -> Relay:
    return request.app.state.relay


@get("/", sync_to_thread=False, operation_id="getService", operation_class=PublicOperation)
def root() -> dict[str, str]:
    return {"message": "WebSocket Bridge is running", "version": __version__}


@get("/healthz", sync_to_thread=False, operation_id="getLiveness", operation_class=PublicOperation)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get(
    "/readyz",
    sync_to_thread=False,
    operation_id="getReadiness",
    operation_class=PublicOperation,
    responses={503: ResponseSpec(dict[str, Any], description="Not ready (reason says why).", generate_examples=False)},
)
def readyz(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    ready, reason = _relay(request).status()
    # A failed token refresh keeps the last good tokens: still ready, and said so here.
    tokens = token_store(request).health()
    if ready:
        return Response({"status": "ready", "broker": _relay(request).broker.describe(), "tokens": tokens})
    return Response(
        {"status": "not ready", "reason": reason, "tokens": tokens}, status_code=HTTP_503_SERVICE_UNAVAILABLE
    )


@get(
    "/metrics",
    sync_to_thread=False,
    media_type="text/plain; version=0.0.4",
    operation_id="getMetrics",
    operation_class=PublicOperation,
)
def metrics_endpoint(request: Request[Any, Any, Any]) -> bytes:
    return metrics.render()


PROBE_HANDLERS = [root, healthz, readyz, metrics_endpoint]
