"""Logging set-up with a filter that masks every configured secret, whatever logs it."""

from __future__ import annotations

import logging

__all__ = ["RedactSecrets", "configure_logging", "learn_secrets", "weak_secrets"]


#: Shorter secrets are not masked: masking "a" would mangle every log line (and such a
#: token is refused as weak at start-up anyway; see ``weak_secrets``).
MIN_MASKED_LENGTH = 8
#: Tokens shorter than this are reported as weak when the appliance starts.
MIN_STRONG_LENGTH = 16


def weak_secrets(named: dict[str, str | None]) -> list[str]:
    """Names of the configured secrets that are too short to be safe."""
    return [name for name, value in named.items() if value is not None and len(value) < MIN_STRONG_LENGTH]


class RedactSecrets(logging.Filter):
    """Replace secret values in log records with ``***`` (defence in depth: we never log them)."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if len(s) >= MIN_MASKED_LENGTH]

    def learn(self, secrets: list[str]) -> None:
        """Mask these values too (a rotated token): the set grows, an old value stays masked."""
        for secret in secrets:
            if len(secret) >= MIN_MASKED_LENGTH and secret not in self.secrets:
                self.secrets.append(secret)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(secret in message for secret in self.secrets):
            for secret in self.secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, None
        return True


def learn_secrets(secrets: list[str]) -> None:
    """Teach every redaction filter on the root logger's handlers new secret values."""
    for handler in logging.getLogger().handlers:
        for filter_ in handler.filters:
            if isinstance(filter_, RedactSecrets):
                filter_.learn(secrets)


def configure_logging(level: str, secrets: list[str]) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
