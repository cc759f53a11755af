"""The HTTP API's representation: the msgspec Structs its handlers take and return (appliance/api.py).

They are what the OpenAPI document at ``/schema/openapi.json`` is made of, with descriptions, examples and
the bounds the command service checks (appliance/api_schema.py says what Litestar does not infer), so the
document is accurate enough to generate an LLM tool definition from.
"""

from __future__ import annotations

from typing import Annotated, Literal, cast

from litestar.openapi.spec import Example, Schema
from litestar.params import KwargDefinition
from msgspec import UNSET, Meta, Struct, UnsetType

from .core.protocol import CLIENT_ID_PATTERN
from .core.protocol_v2 import BROADCAST, GROUP_PREFIX, MAX_COMMAND_ID_LENGTH
from .settings import Settings

__all__ = [
    "TARGET_PATTERN",
    "TIMEOUT_MAX_MS",
    "BroadcastReply",
    "ClientManifest",
    "ClientPage",
    "ClientRecord",
    "CommandBody",
    "CommandId",
    "CommandRecordBody",
    "CommandResult",
    "ErrorBody",
    "HistoryEntry",
    "RecentCommand",
]


# --- bodies --------------------------------------------------------------------------------------

CommandId = str | int
#: The largest integer JSON carries exactly (core/protocol_v2's rule for integer ids).
MAX_SAFE_INTEGER = 2**53 - 1
#: CommandId with the service's rule (core/protocol_v2.is_valid_command_id) in the schema; the service checks it.
SchemaCommandId = (
    Annotated[str, KwargDefinition(min_length=1, max_length=MAX_COMMAND_ID_LENGTH)]
    | Annotated[int, KwargDefinition(ge=-MAX_SAFE_INTEGER, le=MAX_SAFE_INTEGER)]
)

#: The targets the command service accepts (core/protocol_v2.target_kind), for the schema only: the handler
#: answers any other with 422 invalid_target, which a caller can act on (msgspec's own error would not name it).
TARGET_PATTERN = rf"^([a-zA-Z0-9_-]{{1,50}}|\{BROADCAST}|{GROUP_PREFIX}[a-zA-Z0-9_-]{{1,50}})$"
#: The schema's maximum for wait_ms and timeout_ms: COMMAND_TIMEOUT_MAX_MS's default (the handler checks the setting).
TIMEOUT_MAX_MS: int = Settings.model_fields["command_timeout_max_ms"].default


class CommandBody(Struct, forbid_unknown_fields=True):
    """A command for one client, every client (``*``) or a group (``group:<name>``)."""

    @staticmethod
    def refine_schema(schema: Schema) -> None:
        """What the fields alone cannot say (api_schema.StrictStructSchemaPlugin): queue takes one client id."""
        schema.schema_if = Schema(properties={"queue": Schema(const=True)}, required=["queue"])
        schema.then = Schema(properties={"target": Schema(pattern=CLIENT_ID_PATTERN.pattern)})

    target: Annotated[
        str,
        KwargDefinition(
            min_length=1,
            pattern=TARGET_PATTERN,
            description='A client id (^[a-zA-Z0-9_-]{1,50}$), "*" for every client, or "group:<name>"; '
            "another is answered 422 invalid_target.",
            examples=[Example(value="unity_client_1")],
        ),
    ]
    message: Annotated[str, Meta(description="The text the client receives.", examples=["MoveForward 10"])]
    id: Annotated[
        SchemaCommandId | None,
        Meta(
            description=f"Your id for this command (string of 1-{MAX_COMMAND_ID_LENGTH} characters, or integer); "
            "generated if absent. It also makes the command safe to retry: the same id within "
            "IDEMPOTENCY_WINDOW_SECONDS (default 600) returns the first command's outcome (marked replayed), "
            "or waits for it, and never reaches the client twice; the same id for another command is 409."
        ),
    ] = None
    wait_ms: (
        Annotated[
            int,
            KwargDefinition(
                ge=1,
                le=TIMEOUT_MAX_MS,
                description="Wait this long for the client's reply: 200 with the reply, or 504. "
                "Without it the answer is 202 as soon as the command is delivered or queued. "
                'For "*" or a group: 200 with the count, the replies of version-2 clients and those that did '
                "not reply in time (no_reply), as soon as all replied or when wait_ms is over. "
                f"At most COMMAND_TIMEOUT_MAX_MS (default {TIMEOUT_MAX_MS}); more is 422.",
            ),
            Meta(ge=1),
        ]
        | None
    ) = None
    timeout_ms: (
        Annotated[
            int,
            KwargDefinition(
                ge=1,
                le=TIMEOUT_MAX_MS,
                description="How long a queued command may wait for its client (without wait_ms). "
                f"At most COMMAND_TIMEOUT_MAX_MS (default {TIMEOUT_MAX_MS}); more is 422.",
            ),
            Meta(ge=1),
        ]
        | None
    ) = None
    queue: Annotated[
        bool, Meta(description="Keep the command for a client that is not connected and deliver it when it connects.")
    ] = False


class BroadcastReply(Struct):
    """A version-2 client's reply to a broadcast or group command whose caller waited (wait_ms)."""

    client: str
    message: str
    rtt_ms: Annotated[float, Meta(description="From the broadcast's send to this reply, in milliseconds.")]


class CommandResult(Struct, omit_defaults=True):
    """An outcome: the fields of its status only (the field order is the one the service writes them in)."""

    id: CommandId
    status: Literal["delivered", "queued", "replied", "timeout"]
    target: str
    sender: str | None = None
    message: Annotated[str | None, Meta(description="The client's reply (status replied).")] = None
    rtt_ms: Annotated[float | None, Meta(description="Round trip to the reply, in milliseconds.")] = None
    count: Annotated[int | None, Meta(description='Clients reached by "*" or a group, cluster-wide.')] = None
    replies: Annotated[
        list[BroadcastReply] | None,
        Meta(description='"*" or a group with wait_ms: the replies of version-2 clients, in arrival order.'),
    ] = None
    no_reply: Annotated[
        list[str] | None,
        Meta(description='"*" or a group with wait_ms: version-2 clients that did not reply within wait_ms.'),
    ] = None
    expires_in_ms: Annotated[int | None, Meta(description="How long a queued command waits.")] = None
    duplicate: bool | None = None
    delivered: Annotated[
        bool | None, Meta(description="timeout: whether the command reached the client (then follow it up by id).")
    ] = None
    detail: str | None = None
    replayed: Annotated[
        bool | None, Meta(description="true: the outcome of an earlier request with the same id or Idempotency-Key.")
    ] = None


class ErrorBody(Struct, omit_defaults=True):
    error: Annotated[
        str,
        Meta(
            description="target_offline, message_too_large, rate_limited, too_many_keys, queue_full, duplicate_id, "
            "delivery_failed, invalid_target, target_not_client, ..."
        ),
    ]
    detail: str
    target: str | None = None
    id: CommandId | None = None
    limit: int | None = None
    retry_after_ms: int | None = None
    history: Annotated[
        list[HistoryEntry] | None, Meta(description="GET /api/v1/clients/{id}: the id's connect history.")
    ] = None
    recent_commands: Annotated[
        list[RecentCommand] | None,
        Meta(description="GET /api/v1/clients/{id}: the commands last sent to the id, while still kept."),
    ] = None


class HistoryEntry(Struct):
    """One closed connection of an id (appliance/core/history.py)."""

    connected_at: str
    closed_at: str
    duration_seconds: float
    role: str
    instance: Annotated[str, Meta(description="The instance that held the connection.")]
    remote: Annotated[str, Meta(description="Address the connection came from (as the relay saw it).")]
    code: Annotated[int, Meta(description="Close code: the relay's (closed_by relay) or the one the peer sent.")]
    reason: Annotated[str, Meta(description="Close reason sent with the code (the peer's text when closed_by peer).")]
    closed_by: Annotated[Literal["relay", "peer"], Meta(description="Who sent the first close frame.")]
    protocol: int = 1
    token: str | None = None
    token_version: int | None = None
    messages_in: int = 0
    messages_out: int = 0


class RecentCommand(Struct, omit_defaults=True):
    """One command handed to a client's socket (appliance/core/recent.py), newest first.

    Kept in the memory of the instance that held the client: the last
    RECENT_COMMANDS_PER_CLIENT per client, texts cut to RECENT_COMMANDS_MAX_CHARS.
    """

    at: Annotated[str, Meta(description="When the relay handed it to the client's socket (UTC).")]
    controller: Annotated[
        str, Meta(description="Who sent it: a controller's id; http, dashboard or mcp for those paths.")
    ]
    message: Annotated[str, Meta(description="The command's text, cut to the length cap (… marks a cut).")]
    outcome: Annotated[
        Literal["replied", "pending", "timeout", "error", "uncorrelated"],
        Meta(
            description="uncorrelated: no reply can be matched (no id, or a broadcast); pending: waiting for the "
            "reply; replied, timeout, error (see detail)."
        ),
    ]
    instance: Annotated[str, Meta(description="The instance that held the client and recorded it.")]
    id: Annotated[CommandId | None | UnsetType, Meta(description="The command's id, if it had one.")] = UNSET
    reply: Annotated[str | None, Meta(description="The client's reply (outcome replied), cut to the cap.")] = None
    rtt_ms: Annotated[
        float | None, Meta(description="From handing the command to the socket to the reply, as that instance saw it.")
    ] = None
    detail: Annotated[str | None, Meta(description="Why it failed (outcome error).")] = None


#: Absent unless set (the single-record GET always sets them, empty or not): ``UNSET`` typed as the list, so
#: the schema says "a list" exactly as before while an unset field is left out of the JSON.
_ABSENT_HISTORYENTRY = cast(list[HistoryEntry], UNSET)
_ABSENT_RECENTCOMMAND = cast(list[RecentCommand], UNSET)


class ManifestArgument(Struct, omit_defaults=True):
    type: Annotated[Literal["string", "number", "integer", "boolean"], Meta(description="JSON Schema type.")]
    description: str = ""
    enum: list[str | int | float | bool] | None = None
    minimum: float | None = None
    maximum: float | None = None


class ManifestArguments(Struct):
    type: Literal["object"]
    properties: Annotated[
        dict[str, ManifestArgument], Meta(description="The arguments, in order: the words after the command's name.")
    ]
    required: Annotated[list[str], Meta(description="The arguments that must be given (the first ones).")]


class ManifestCommand(Struct):
    name: Annotated[str, Meta(description="The command's first word (matched ignoring case).")]
    description: str
    arguments: ManifestArguments


class ClientManifest(Struct):
    """What a version-2 client declared it accepts (docs/protocol.md, "Command manifest")."""

    commands: list[ManifestCommand]
    updated_at: Annotated[str, Meta(description="When the client sent it (UTC).")]


class ClientRecord(Struct, omit_defaults=True):
    id: str
    role: str
    instance: str
    connected_since: str
    remote: str
    messages_in: int
    messages_out: int
    last_activity: str
    token: Annotated[
        str | None | UnsetType, Meta(description="Name of the token that opened it (never its value).")
    ] = UNSET
    token_version: int | None | UnsetType = UNSET
    protocol: Annotated[int, Meta(description="2 for clients speaking wsbridge.v2 (absent: 1).")] = 1
    groups: Annotated[list[str], Meta(description="Groups the client joined (absent: none).")] = []
    manifest: Annotated[
        ClientManifest | None,
        Meta(description="The commands the client declared (GET /api/v1/clients/{id} only; absent: none declared)."),
    ] = None
    history: Annotated[
        list[HistoryEntry],
        Meta(description="Connect history of the id, cluster-wide, newest first (GET /api/v1/clients/{id} only)."),
    ] = _ABSENT_HISTORYENTRY
    recent_commands: Annotated[
        list[RecentCommand],
        Meta(
            description="Commands last sent to the id and their replies, newest first (GET /api/v1/clients/{id} only)."
        ),
    ] = _ABSENT_RECENTCOMMAND


class ClientPage(Struct):
    clients: list[ClientRecord]
    count: Annotated[int, Meta(description="Connections matching the filters, cluster-wide.")]
    next_cursor: Annotated[str | None, Meta(description="Pass as cursor for the next page; null on the last.")] = None


class CommandRecordBody(Struct):
    """What became of a command sent through the HTTP API, MCP or the dashboard."""

    id: CommandId
    target: str
    message: str
    status: Annotated[
        Literal["sending", "delivered", "queued", "replied", "timeout", "failed"],
        Meta(description="sending: not at the client yet; timeout: no reply yet when its caller stopped waiting."),
    ]
    caller: Annotated[
        Literal["waiting", "answered", "cancelled", "disconnected"],
        Meta(description="What its caller did: still waiting, got an answer, cancelled (MCP), or went away (HTTP)."),
    ]
    delivered: Annotated[bool, Meta(description="Whether it reached the client's socket.")]
    open: Annotated[bool, Meta(description="true: a reply may still come (wait_ms waits for it).")]
    sent_at: float
    updated_at: float
    open_until: float
    message_truncated: Annotated[
        bool, Meta(description="true: message holds only the first 4 KiB of the command (as JSON text).")
    ]
    sender: str | None = None
    reply: Annotated[str | None, Meta(description="The client's reply (status replied).")] = None
    rtt_ms: float | None = None
    late: Annotated[bool | None, Meta(description="true: the reply came after its caller stopped waiting.")] = None
    error: str | None = None
    detail: str | None = None
    reply_truncated: Annotated[
        bool | None, Meta(description="true: reply holds only the first 4 KiB of the client's reply.")
    ] = None
    lost: Annotated[
        bool | None,
        Meta(
            description="true: the instance that sent it stopped (restarted or crashed) before its outcome; "
            "status is the last one known and nothing more will be recorded."
        ),
    ] = None
