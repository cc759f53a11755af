"""Logging set-up: human-readable or JSON lines, with a filter that masks every configured secret.

``LOG_FORMAT=text`` (the default) writes ``time LEVEL logger: message [client_id=... conn=...]``;
``LOG_FORMAT=json`` writes one JSON object per line for log shippers (fields in
:data:`JSON_FIELDS`, documented in docs/deploy.md). Lines about one connection carry its
client id and connection key: log them with ``extra=connection_fields(...)``. Secrets
are masked in the message, the traceback and every field, in both formats.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

__all__ = [
    "JSON_FIELDS",
    "JsonFormatter",
    "RedactSecrets",
    "TextFormatter",
    "configure_logging",
    "connection_fields",
    "learn_secrets",
    "weak_secrets",
]


#: Shorter secrets are not masked: masking "a" would mangle every log line (and such a
#: token is refused at start-up anyway; see ``Settings.token_problems``).
MIN_MASKED_LENGTH = 8
#: Tokens shorter than this are refused when the appliance starts (``Settings.token_problems``).
MIN_STRONG_LENGTH = 16


def weak_secrets(named: dict[str, str | None]) -> list[str]:
    """Names of the configured secrets that are too short to be safe."""
    return [name for name, value in named.items() if value is not None and len(value) < MIN_STRONG_LENGTH]


#: Headers that carry tokens, as uvicorn and websockets log them at DEBUG ("< x-auth-token: ...").
#: A presented token that is not configured (a typo, a rotated-out one) is not in the list
#: of secrets, so these are masked by name, whatever their value.
_TOKEN_HEADER = re.compile(r"(?i)\b(x-auth-token|sec-websocket-protocol|authorization)(\s*:\s*)[^\r\n\"]+")

#: The dashboard's OpenID Connect callback (ui/oidc.py) carries a one-time code and state in its query,
#: which uvicorn's access log would write: masked like a secret.
_OIDC_CALLBACK = re.compile(r"(/login/oidc/callback\?)[^\s\"]+")

_FORMATTER = logging.Formatter()


class RedactSecrets(logging.Filter):
    """Replace secret values in log records with ``***`` (defence in depth: we never log them)."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        # Longest first: a URL is masked whole before the password inside it.
        self.secrets = sorted((s for s in secrets if len(s) >= MIN_MASKED_LENGTH), key=len, reverse=True)

    def learn(self, secrets: list[str]) -> None:
        """Mask these values too (a rotated token): the set grows, an old value stays masked."""
        for secret in secrets:
            if len(secret) >= MIN_MASKED_LENGTH and secret not in self.secrets:
                self.secrets.append(secret)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self.mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[0] is not None:
            # Tracebacks carry exception messages (a connection URL, say): format them here,
            # masked, so no formatter downstream ever sees the raw exception.
            record.exc_text = self.mask(_FORMATTER.formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        if record.stack_info:
            record.stack_info = self.mask(record.stack_info)
        return True

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        if _TOKEN_HEADER.search(text):
            text = _TOKEN_HEADER.sub(r"\1\2***", text)
        if "oidc/callback?" in text:
            text = _OIDC_CALLBACK.sub(r"\1***", text)
        return text


def learn_secrets(secrets: list[str]) -> None:
    """Teach every redaction filter on the root logger's handlers new secret values."""
    for handler in logging.getLogger().handlers:
        for filter_ in handler.filters:
            if isinstance(filter_, RedactSecrets):
                filter_.learn(secrets)


#: Per-connection context a log call may pass in ``extra`` (see :func:`connection_fields`).
CONTEXT_FIELDS = ("client_id", "conn", "role", "remote")

#: Fields of a JSON log line: always ``ts``, ``level``, ``logger``, ``message``, ``instance``;
#: the context fields when the line is about one connection; ``exc`` with a traceback.
JSON_FIELDS = ("ts", "level", "logger", "message", "instance", *CONTEXT_FIELDS, "exc")


def connection_fields(client_id: str, conn: str | None = None, role: str | None = None) -> dict[str, str]:
    """``extra=`` for a log line about one connection (its id and, once known, its key and role)."""
    fields = {"client_id": client_id}
    if conn is not None:
        fields["conn"] = conn
    if role is not None:
        fields["role"] = role
    return fields


class TextFormatter(logging.Formatter):
    """The human-readable format, with the connection context appended when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{key}={getattr(record, key)}" for key in CONTEXT_FIELDS if hasattr(record, key))
        if not context:
            return line
        first, newline, rest = line.partition("\n")  # Keep a traceback below the first line.
        return f"{first} [{context}]{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line (``LOG_FORMAT=json``); every string field is masked again."""

    def __init__(self, instance: str, redact: RedactSecrets) -> None:
        super().__init__()
        self.instance = instance
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.gmtime(record.created)
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "instance": self.instance,
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = str(value)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["exc"] = (entry.get("exc", "") + "\n" + record.stack_info).strip()
        for key, value in entry.items():
            if isinstance(value, str):
                entry[key] = self.redact.mask(value)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, secrets: list[str], fmt: str = "text", instance: str = "") -> None:
    """Send every log record (ours, uvicorn's, libraries') through one masked handler on stderr."""
    handler = logging.StreamHandler()
    redact = RedactSecrets(secrets)
    handler.setFormatter(JsonFormatter(instance, redact) if fmt == "json" else TextFormatter())
    handler.addFilter(redact)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
