"""A version-2 client's command manifest: what it accepts, declared by the client itself. No I/O.

A client sends ``{"type": "manifest", "commands": [...]}`` after it connects (and again
whenever its commands change); each command has a name, a description and a JSON Schema
of its arguments, which are the words after the name, in the order of ``properties``.
:func:`parse_manifest` validates the frame (docs/protocol.md, "Command manifest") and
:func:`check_command` tells whether a command text fits a manifest, so an LLM learns what a
client accepts instead of guessing, and a command it did not declare is refused before it
reaches the device.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import msgspec

__all__ = [
    "ARGUMENT_TYPES",
    "MAX_ARGUMENTS",
    "MAX_COMMANDS",
    "MANIFESTS_PER_SECOND",
    "MANIFEST_BURST",
    "MAX_DESCRIPTION_CHARS",
    "MAX_MANIFEST_BYTES",
    "MANIFEST_BYTES_PER_INSTANCE",
    "ManifestBudget",
    "ManifestError",
    "bind_arguments",
    "check_command",
    "encode_manifest_accepted",
    "encode_manifest_error",
    "is_manifest_frame",
    "manifest_frame",
    "parse_manifest",
]

#: Largest manifest frame, in UTF-8 bytes (a command with three described arguments is ~400).
MAX_MANIFEST_BYTES = 32 * 1024
MAX_COMMANDS = 128
MAX_ARGUMENTS = 16
MAX_DESCRIPTION_CHARS = 1000
MAX_ENUM_VALUES = 64
#: Manifest frames a client may send: this many a second after a burst (the connection's reading pauses beyond).
MANIFESTS_PER_SECOND = 1.0
MANIFEST_BURST = 5
#: Bytes of manifests one instance keeps at once (its clients' manifests are in Redis presence too): ~1,000
#: manifests of the 32 KiB maximum, or 16,000 of 2 KiB. A connection flood with 32 KiB manifests (10,000
#: connections: 340 MB) would otherwise fill the shipped 192 MB Redis.
MANIFEST_BYTES_PER_INSTANCE = 32 * 1024 * 1024
#: An argument's word as an error text quotes it, at most (a command text may be 64 KiB).
_QUOTED_CHARS = 40
#: A command name is one word, as clients split the text (Unity's dispatcher, BridgeClient).
COMMAND_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
ARGUMENT_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
ARGUMENT_TYPES = ("string", "number", "integer", "boolean")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_BOOLEANS = {"true": True, "false": False}

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class ManifestError:
    """Why a manifest or a command against it is refused: a code, a detail naming the field, and the field."""

    code: str  # invalid_manifest | unknown_command | invalid_arguments
    detail: str
    path: str = ""


def is_manifest_frame(text: str) -> bool:
    """Cheap test of a v2 client frame before decoding it: only frames that mention "manifest" are looked at."""
    return text.startswith("{") and '"manifest"' in text


def parse_manifest(text: str) -> dict[str, Any] | ManifestError | None:
    """The normalized manifest ``{"commands": [...]}``, an error, or None when ``text`` is no manifest frame.

    None (a JSON object whose ``type`` is not ``"manifest"``, or no JSON at all) leaves the
    frame to the usual path: it is the client's text for the controllers, as before.
    """
    if len(text) * 4 > MAX_MANIFEST_BYTES and len(text.encode()) > MAX_MANIFEST_BYTES:
        if not is_manifest_frame(text):
            return None
        return ManifestError("invalid_manifest", f"the manifest exceeds {MAX_MANIFEST_BYTES} bytes")
    try:
        data = _decoder.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("type") != "manifest":
        return None
    try:
        return {"commands": _commands(data)}
    except _Invalid as exc:
        return ManifestError("invalid_manifest", f"{exc.path}: {exc.detail}" if exc.path else exc.detail, exc.path)


def manifest_frame(commands: list[dict[str, Any]]) -> str:
    """The frame a client sends: ``{"type": "manifest", "commands": [...]}``."""
    return _encoder.encode({"type": "manifest", "commands": commands}).decode()


def encode_manifest_accepted(manifest: dict[str, Any]) -> str:
    """To the client: ``{"type":"manifest_accepted","commands":N}``."""
    return _encoder.encode({"type": "manifest_accepted", "commands": len(manifest["commands"])}).decode()


def encode_manifest_error(error: ManifestError) -> str:
    """To the client: ``{"type":"manifest_error","error":"invalid_manifest","detail":…,"path":…}``."""
    return _encoder.encode(
        {"type": "manifest_error", "error": error.code, "detail": error.detail, "path": error.path}
    ).decode()


class ManifestBudget:
    """The manifests one instance keeps, by connection, bounded in bytes (their encoded size)."""

    def __init__(self, limit: int = MANIFEST_BYTES_PER_INSTANCE) -> None:
        self.limit = limit
        self.used = 0
        self._sizes: dict[object, int] = {}

    def admit(self, holder: object, manifest: dict[str, Any]) -> ManifestError | None:
        """Keep ``holder``'s new manifest (replacing its last), or say why not (the last one stays)."""
        size = len(_encoder.encode(manifest))
        previous = self._sizes.get(holder, 0)
        if self.used - previous + size > self.limit:
            return ManifestError(
                "manifests_full",
                f"this relay instance keeps {self.limit} bytes of manifests and has no room for {size} more: "
                "keep descriptions short, or connect later",
            )
        self._sizes[holder] = size
        self.used += size - previous
        return None

    def release(self, holder: object) -> None:
        self.used -= self._sizes.pop(holder, 0)


# --- validation ------------------------------------------------------------------------------


class _Invalid(Exception):
    def __init__(self, path: str, detail: str) -> None:
        super().__init__(detail)
        self.path = path
        self.detail = detail


def _only(data: dict[str, Any], allowed: tuple[str, ...], path: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        where = f"{path}." if path else ""
        raise _Invalid(f"{where}{_quoted(unknown[0])}", f"unknown field (allowed: {', '.join(allowed)})")


def _text(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(path, "must be a string")
    if len(value) > MAX_DESCRIPTION_CHARS:
        raise _Invalid(path, f"at most {MAX_DESCRIPTION_CHARS} characters")
    return value


def _commands(data: dict[str, Any]) -> list[dict[str, Any]]:
    _only(data, ("type", "commands"), "")
    commands = data.get("commands")
    if not isinstance(commands, list):
        raise _Invalid("commands", "must be a list of commands")
    if len(commands) > MAX_COMMANDS:
        raise _Invalid("commands", f"at most {MAX_COMMANDS} commands")
    seen: dict[str, str] = {}
    normalized = []
    for index, command in enumerate(commands):
        path = f"commands[{index}]"
        spec = _command(command, path)
        folded = spec["name"].casefold()
        if folded in seen:
            raise _Invalid(f"{path}.name", f"'{spec['name']}' is declared twice (names ignore case)")
        seen[folded] = spec["name"]
        normalized.append(spec)
    return normalized


def _command(command: Any, path: str) -> dict[str, Any]:
    if not isinstance(command, dict):
        raise _Invalid(path, 'must be an object {"name", "description", "arguments"}')
    _only(command, ("name", "description", "arguments"), path)
    name = command.get("name")
    if not isinstance(name, str) or COMMAND_NAME_PATTERN.fullmatch(name) is None:
        raise _Invalid(f"{path}.name", "must be one word of 1 to 64 letters, digits or _ . : / -")
    description = _text(command.get("description", ""), f"{path}.description")
    return {"name": name, "description": description, "arguments": _arguments(command.get("arguments"), path)}


def _arguments(schema: Any, path: str) -> dict[str, Any]:
    path = f"{path}.arguments"
    if schema is None:
        return {"type": "object", "properties": {}, "required": []}
    if not isinstance(schema, dict):
        raise _Invalid(path, 'must be a JSON Schema object {"type": "object", "properties", "required"}')
    _only(schema, ("type", "properties", "required"), path)
    if schema.get("type", "object") != "object":
        raise _Invalid(f"{path}.type", 'must be "object"')
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise _Invalid(f"{path}.properties", "must be an object of argument schemas")
    if len(properties) > MAX_ARGUMENTS:
        raise _Invalid(f"{path}.properties", f"at most {MAX_ARGUMENTS} arguments")
    normalized = {
        name: _argument(name, prop, f"{path}.properties.{_quoted(name)}") for name, prop in properties.items()
    }
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise _Invalid(f"{path}.required", "must be a list of argument names")
    for name in required:
        if name not in normalized:
            raise _Invalid(f"{path}.required", f"'{name}' is not in properties")
    if len(set(required)) != len(required):
        raise _Invalid(f"{path}.required", "names an argument twice")
    # Arguments are positional: an optional one before a required one could never be left out.
    names = list(normalized)
    if set(names[: len(required)]) != set(required):
        raise _Invalid(f"{path}.required", "required arguments must come first in properties (they are positional)")
    return {"type": "object", "properties": normalized, "required": names[: len(required)]}


def _argument(name: str, prop: Any, path: str) -> dict[str, Any]:
    if ARGUMENT_NAME_PATTERN.fullmatch(name) is None:
        raise _Invalid(path, "an argument name is a letter or _ then up to 63 letters, digits or _")
    if not isinstance(prop, dict):
        raise _Invalid(path, 'must be an object {"type", "description"}')
    _only(prop, ("type", "description", "enum", "minimum", "maximum"), path)
    kind = prop.get("type")
    if kind not in ARGUMENT_TYPES:
        raise _Invalid(f"{path}.type", f"must be one of {', '.join(ARGUMENT_TYPES)}")
    normalized: dict[str, Any] = {
        "type": kind,
        "description": _text(prop.get("description", ""), f"{path}.description"),
    }
    if "enum" in prop:
        values = prop["enum"]
        if not isinstance(values, list) or not 1 <= len(values) <= MAX_ENUM_VALUES:
            raise _Invalid(f"{path}.enum", f"must be a list of 1 to {MAX_ENUM_VALUES} values")
        for value in values:
            if _typed(kind, value) is None:
                raise _Invalid(f"{path}.enum", f"{_quoted(_encoder.encode(value).decode())} is not {_article(kind)}")
        normalized["enum"] = values
    for bound in ("minimum", "maximum"):
        if bound in prop:
            value = prop[bound]
            if kind not in ("number", "integer"):
                raise _Invalid(f"{path}.{bound}", f"applies to numbers, not to a {kind}")
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise _Invalid(f"{path}.{bound}", "must be a number")
            normalized[bound] = value
    return normalized


def _typed(kind: str, value: Any) -> Any:
    """``value`` if it is a JSON value of ``kind``, else None."""
    if kind == "string":
        return value if isinstance(value, str) else None
    if kind == "boolean":
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if kind == "integer":
        return value if isinstance(value, int) or (isinstance(value, float) and value.is_integer()) else None
    return value if isinstance(value, int | float) and math.isfinite(value) else None


# --- commands against a manifest ---------------------------------------------------------------


def _describe(spec: dict[str, Any]) -> str:
    """``MoveForward <distance:number> [speed:number]``: how the command is written."""
    schema = spec["arguments"]
    required = set(schema["required"])
    words = [spec["name"]]
    for name, prop in schema["properties"].items():
        word = f"{name}:{prop['type']}"
        words.append(f"<{word}>" if name in required else f"[{word}]")
    return " ".join(words)


def _article(kind: str) -> str:
    return f"an {kind}" if kind == "integer" else f"a {kind}"


def _word(kind: str, word: str) -> Any:
    """A word of the command text read as ``kind``, or None when it is not one."""
    if kind == "string":
        return word
    if kind == "boolean":
        return _BOOLEANS.get(word.lower())
    if kind == "integer":
        if _INTEGER.fullmatch(word) is None:
            return None
        try:
            return int(word)
        except ValueError:  # More digits than Python converts (4,300): no bound could take it anyway.
            return None
    if _NUMBER.fullmatch(word) is None:
        return None
    value = float(word)
    return value if math.isfinite(value) else None


def _quoted(word: str) -> str:
    return word if len(word) <= _QUOTED_CHARS else word[:_QUOTED_CHARS] + "…"


def bind_arguments(spec: dict[str, Any], words: list[str]) -> dict[str, Any] | ManifestError:
    """The arguments of one declared command from the words after its name, typed, or why they do not fit.

    Words map to ``properties`` in order; when the last argument is a string it takes the rest
    of the text (``Say hello world`` gives ``text = "hello world"``), as clients read it.
    """
    schema = spec["arguments"]
    properties: dict[str, dict[str, Any]] = schema["properties"]
    names = list(properties)
    usage = f"Usage: {_describe(spec)}."
    if names and properties[names[-1]]["type"] == "string" and len(words) > len(names):
        words = [*words[: len(names) - 1], " ".join(words[len(names) - 1 :])]
    if len(words) > len(names):
        count = f"{len(names)} argument{'s' if len(names) != 1 else ''}" if names else "no arguments"
        return ManifestError("invalid_arguments", f"{spec['name']} takes {count}; {len(words)} were given. {usage}")
    if len(words) < len(schema["required"]):
        missing = ", ".join(schema["required"][len(words) :])
        return ManifestError("invalid_arguments", f"{spec['name']} needs {missing}. {usage}")
    bound: dict[str, Any] = {}
    for name, word in zip(names, words, strict=False):
        prop = properties[name]
        value = _word(prop["type"], word)
        if value is None:
            return ManifestError(
                "invalid_arguments",
                f"{spec['name']}: {name} must be {_article(prop['type'])}; '{_quoted(word)}' is not. {usage}",
            )
        if "enum" in prop and value not in prop["enum"]:
            allowed = ", ".join(str(v) for v in prop["enum"])
            return ManifestError("invalid_arguments", f"{spec['name']}: {name} must be one of {allowed}. {usage}")
        if ("minimum" in prop and value < prop["minimum"]) or ("maximum" in prop and value > prop["maximum"]):
            low, high = prop.get("minimum", "-inf"), prop.get("maximum", "inf")
            return ManifestError(
                "invalid_arguments",
                f"{spec['name']}: {name} must be from {low} to {high}; {_quoted(word)} is not. {usage}",
            )
        bound[name] = value
    return bound


def find_command(manifest: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The declared command called ``name`` (names ignore case, as clients dispatch them)."""
    folded = name.casefold()
    return next((spec for spec in manifest["commands"] if spec["name"].casefold() == folded), None)


def check_command(manifest: dict[str, Any], message: str) -> ManifestError | None:
    """None when ``message`` is a declared command with fitting arguments, else why it is not."""
    words = message.split()
    declared = ", ".join(spec["name"] for spec in manifest["commands"]) or "none"
    if not words:
        return ManifestError("unknown_command", f"The command is empty. Declared commands: {declared}.")
    spec = find_command(manifest, words[0])
    if spec is None:
        return ManifestError(
            "unknown_command", f"'{_quoted(words[0])}' is not a declared command. Declared commands: {declared}."
        )
    bound = bind_arguments(spec, words[1:])
    return bound if isinstance(bound, ManifestError) else None
