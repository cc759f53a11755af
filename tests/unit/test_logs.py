import logging

from appliance.logs import RedactSecrets


def test_secrets_are_masked_in_any_log_record(caplog):
    logger = logging.getLogger("test.redaction")
    caplog.handler.addFilter(RedactSecrets(["s3cret-token"]))
    with caplog.at_level(logging.INFO):
        logger.info("header was %s", "s3cret-token")
        logger.info("plain s3cret-token in text")
    assert "s3cret-token" not in caplog.text
    assert caplog.text.count("***") == 2
