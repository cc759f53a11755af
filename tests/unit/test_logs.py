import logging

from appliance.logs import RedactSecrets, weak_secrets


def test_secrets_are_masked_in_any_log_record(caplog):
    logger = logging.getLogger("test.redaction")
    caplog.handler.addFilter(RedactSecrets(["s3cret-token"]))
    with caplog.at_level(logging.INFO):
        logger.info("header was %s", "s3cret-token")
        logger.info("plain s3cret-token in text")
    assert "s3cret-token" not in caplog.text
    assert caplog.text.count("***") == 2


def test_very_short_secrets_are_not_masked_but_reported_as_weak():
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "a plain sentence", None, None)
    RedactSecrets(["a"]).filter(record)
    assert record.getMessage() == "a plain sentence"
    assert weak_secrets({"LLM_SECRET_TOKEN": "a", "UNITY_CLIENT_TOKEN": "x" * 16, "ADMIN_TOKEN": None}) == [
        "LLM_SECRET_TOKEN"
    ]
