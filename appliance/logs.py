"""Logging set-up with a filter that masks every configured secret, whatever logs it."""

from __future__ import annotations

import logging

__all__ = ["RedactSecrets", "configure_logging", "learn_secrets", "weak_secrets"]


#: Shorter secrets are not masked: masking "a" would mangle every log line (and such a
#: token is refused at start-up anyway; see ``Settings.token_problems``).
MIN_MASKED_LENGTH = 8
#: Tokens shorter than this are refused when the appliance starts (``Settings.token_problems``).
MIN_STRONG_LENGTH = 16


def weak_secrets(named: dict[str, str | None]) -> list[str]:
    """Names of the configured secrets that are too short to be safe."""
    return [name for name, value in named.items() if value is not None and len(value) < MIN_STRONG_LENGTH]


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
        if any(secret in message for secret in self.secrets):
            record.msg, record.args = self._mask(message), None
        if record.exc_info and record.exc_info[0] is not None:
            # Tracebacks carry exception messages (a connection URL, say): format them here,
            # masked, so no formatter downstream ever sees the raw exception.
            record.exc_text = self._mask(_FORMATTER.formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = self._mask(record.exc_text)
        if record.stack_info:
            record.stack_info = self._mask(record.stack_info)
        return True

    def _mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


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
