"""What the OpenAPI document (``/schema/openapi.json``) says beyond what Litestar infers, so it says what the API does.

A fuzzer (schemathesis, tests/integration/test_openapi_fuzz.py) checks every answer against it:

- :class:`ApiOperation`: an invalid request is answered 422 (``validation_as_422``), so the 400 Litestar
  documents for every route with parameters is documented as 422, beside any 422 the route declares itself;
  a 204 has no body (not a JSON ``null``).
- :class:`PublicOperation`: ``/``, ``/healthz``, ``/readyz`` and ``/metrics`` need no token (``security: []``
  instead of the document's global requirement).
- :class:`StrictStructSchemaPlugin`: a Struct with ``forbid_unknown_fields`` has ``additionalProperties: false``,
  and a Struct's ``refine_schema(schema)`` adds what its fields alone cannot say.
- :func:`camel_case_operation_id`: operation ids from handler names (``list_clients`` → ``listClients``) for routes
  that set none.
- :func:`refuse_repeated_query`: ``?limit=1&limit=2`` is refused (422) rather than one of them taken silently.
- :func:`options_handlers`: ``OPTIONS`` answers every method of a path (Litestar's own lists only the first
  handler registered for it: ``Allow: GET, OPTIONS`` for ``/api/v1/clients/{id}``, which has DELETE too).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec
from litestar import Request, Response, route
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.enums import HttpMethod
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException, ValidationException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.spec import OpenAPIResponse, Operation, Schema
from litestar.types import Method

__all__ = [
    "AUTH_ERRORS",
    "ApiOperation",
    "PublicOperation",
    "StrictStructSchemaPlugin",
    "JsonBodyOperation",
    "camel_case_operation_id",
    "options_handlers",
    "refuse_repeated_query",
]

#: What ``http_auth.require_token`` raises: 401 without a token, 403 for a token of another role.
AUTH_ERRORS = [NotAuthorizedException, PermissionDeniedException]


@dataclass
class ApiOperation(Operation):
    """An operation whose invalid requests are documented as the 422 they get, not Litestar's 400."""

    #: Keep a 400 too: a body that is not JSON at all is Litestar's 400 ("JSON is malformed").
    malformed_body_is_400: ClassVar[bool] = False

    def __post_init__(self) -> None:
        responses = self.responses or {}
        no_content = responses.get("204")
        if isinstance(no_content, OpenAPIResponse):  # Response[None] is documented as a JSON null; 204 has no body.
            no_content.content = None
        bad_request = responses.pop("400", None)
        if not isinstance(bad_request, OpenAPIResponse) or bad_request.content is None:
            return
        if self.malformed_body_is_400:
            malformed = copy.deepcopy(bad_request)
            malformed.description = "The body is not JSON."
            responses["400"] = malformed
        for media in bad_request.content.values():
            for example in (media.schema.examples or []) if isinstance(media.schema, Schema) else []:
                if isinstance(example, dict):
                    example.update(status_code=422, detail="Unprocessable Content")
        declared = responses.get("422")
        if not isinstance(declared, OpenAPIResponse) or declared.content is None:
            bad_request.description = "Invalid request (Litestar's validation shape)."
            responses["422"] = bad_request
            return
        # Both shapes: the validation error and the route's own (ErrorBody).
        for media_type, media in declared.content.items():
            other = bad_request.content.get(media_type)
            if other is not None and media.schema is not None and other.schema is not None:
                media.schema = Schema(one_of=[media.schema, other.schema])


@dataclass
class JsonBodyOperation(ApiOperation):
    """An :class:`ApiOperation` with a JSON body: 422 for a body the API refuses, 400 for one that is not JSON."""

    malformed_body_is_400: ClassVar[bool] = True


@dataclass
class PublicOperation(Operation):
    """An operation anyone may call: no security requirement, whatever the document's global one."""

    def __post_init__(self) -> None:
        self.security = []


class StrictStructSchemaPlugin(StructSchemaPlugin):
    """Litestar's Struct schemas, with ``additionalProperties: false`` where msgspec refuses unknown fields."""

    def to_openapi_schema(self, field_definition: Any, schema_creator: Any) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        info = msgspec.inspect.type_info(field_definition.type_)
        if isinstance(info, msgspec.inspect.StructType) and info.forbid_unknown_fields:
            schema.additional_properties = False
        refine = getattr(field_definition.type_, "refine_schema", None)
        if refine is not None:  # A Struct's rules across fields (JSON Schema's if/then), said by the Struct.
            refine(schema)
        return schema


def camel_case_operation_id(route_handler: Any, http_method: Method, path_components: list[Any]) -> str:
    """``list_clients`` → ``listClients``: ids an LLM tool generator can use as function names."""
    first, *rest = route_handler.handler_name.split("_")
    return first + "".join(word.capitalize() for word in rest)


async def refuse_repeated_query(request: Request[Any, Any, Any]) -> None:
    """A ``before_request`` hook: a query parameter given twice is a 422, not a silent choice of one."""
    params = request.query_params
    repeated = sorted(key for key in params if len(params.getall(key)) > 1)
    if repeated:
        raise ValidationException(
            f"query parameter given more than once: {', '.join(repeated)}",
            extra=[{"key": key, "message": "given more than once"} for key in repeated],
        )


def options_handlers(handlers: Iterable[HTTPRouteHandler]) -> Iterator[HTTPRouteHandler]:
    """An ``OPTIONS`` handler for each path served by more than one method, answering them all in ``Allow``."""
    methods: dict[str, set[str]] = {}
    for handler in handlers:
        for path in handler.paths:
            methods.setdefault(path, set()).update(handler.http_methods)
    for path, served in methods.items():
        if len(served) > 1:
            yield _options(path, ", ".join(sorted(served | {HttpMethod.OPTIONS.value})))


def _options(path: str, allow: str) -> HTTPRouteHandler:
    def options() -> Response[None]:
        return Response(None, status_code=204, headers={"Allow": allow})

    return route(path, http_method=HttpMethod.OPTIONS, include_in_schema=False, sync_to_thread=False)(options)
