"""LOG_FORMAT=json: one JSON object per line, documented fields, connection context, never a secret."""

import io
import json
import logging

import pytest

from appliance.logs import JSON_FIELDS, JsonFormatter, RedactSecrets, TextFormatter, connection_fields
from appliance.settings import Settings

SECRET = "s3cret-token-0123456789"


def emit(make_formatter, secrets: list[str], log_call) -> str:
    """Log through a handler set up as configure_logging does: the redaction filter, then the formatter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    redact = RedactSecrets(secrets)
    handler.setFormatter(make_formatter(redact))
    handler.addFilter(redact)
    logger = logging.getLogger("test.jsonlogs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    log_call(logger)
    return stream.getvalue()


def json_lines(secrets: list[str], log_call) -> list[dict]:
    text = emit(lambda redact: JsonFormatter("app-1", redact), secrets, log_call)
    return [json.loads(line) for line in text.splitlines()]


def test_each_record_is_one_json_object_per_line_with_the_documented_fields():
    (line,) = json_lines(
        [], lambda log: log.info("Connected as %s", "client", extra=connection_fields("unity_1", "k1", "client"))
    )
    assert line["message"] == "Connected as client"
    assert (line["level"], line["logger"], line["instance"]) == ("INFO", "test.jsonlogs", "app-1")
    assert (line["client_id"], line["conn"], line["role"]) == ("unity_1", "k1", "client")
    assert line["ts"].endswith("Z") and "T" in line["ts"]
    assert set(line) <= set(JSON_FIELDS)


def test_a_traceback_stays_inside_its_line():
    def call(log):
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            log.exception("failed")

    text = emit(lambda redact: JsonFormatter("app-1", redact), [], call)
    assert len(text.splitlines()) == 1
    line = json.loads(text)
    assert "ValueError: boom" in line["exc"] and "Traceback" in line["exc"]


def test_secrets_are_masked_in_message_arguments_fields_and_tracebacks():
    def call(log):
        log.info("header %s", SECRET, extra={"client_id": f"id-{SECRET}", "remote": SECRET})
        try:
            raise ConnectionError(f"redis://:{SECRET}@host")
        except ConnectionError:
            log.exception("lost %s", "redis")

    lines = json_lines([SECRET], call)
    assert len(lines) == 2
    raw = json.dumps(lines)
    assert SECRET not in raw
    assert lines[0]["message"] == "header ***" and lines[0]["client_id"] == "id-***" and lines[0]["remote"] == "***"
    assert "redis://:***@host" in lines[1]["exc"]


def test_text_format_appends_the_connection_context():
    text = emit(
        lambda redact: TextFormatter(),
        [SECRET],
        lambda log: log.info("Disconnected %s", SECRET, extra=connection_fields("unity_1", "k1")),
    )
    assert text.rstrip().endswith("Disconnected *** [client_id=unity_1 conn=k1]")


@pytest.mark.parametrize(("value", "expected"), [("json", "json"), ("JSON", "json"), ("text", "text")])
def test_log_format_setting(value, expected):
    settings = Settings(_env_file=None, log_format=value)
    assert settings.log_format == expected


def test_log_format_defaults_to_text_and_refuses_anything_else():
    assert Settings(_env_file=None).log_format == "text"
    with pytest.raises(ValueError, match="log_format"):
        Settings(_env_file=None, log_format="yaml")


def test_token_headers_are_masked_whatever_the_token():
    """uvicorn logs request headers at DEBUG: a wrong or rotated-out token is not a configured secret."""
    text = emit(
        lambda redact: JsonFormatter("app-1", redact),
        [SECRET],
        lambda log: [
            log.debug("< x-auth-token: %s", "typo-of-the-token-123456"),
            log.debug("< X-Auth-Token: other-token-987654"),
            log.debug("< sec-websocket-protocol: wsbridge, token.abcdefabcdef"),
        ],
    )
    assert "typo-of-the-token" not in text and "other-token" not in text and "abcdefabcdef" not in text
    assert [json.loads(line)["message"] for line in text.splitlines()] == [
        "< x-auth-token: ***",
        "< X-Auth-Token: ***",
        "< sec-websocket-protocol: ***",
    ]
