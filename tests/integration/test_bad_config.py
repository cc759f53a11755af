"""``wsbridge serve`` with a configuration it cannot use: one clear line, no traceback, no secret."""

import os
import socket
import subprocess
import sys
import tempfile

import pytest

from tests.support import timeout

TOKENS = {"LLM_SECRET_TOKEN": "c" * 32, "UNITY_CLIENT_TOKEN": "u" * 32, "ADMIN_TOKEN": "a" * 32}


@pytest.mark.parametrize(
    "url",
    [
        "notaurl://:hunter2-secret-pw@cache:6379/0",  # a scheme redis-py cannot open
        "cache:6379",  # no scheme at all
        "redis://:hunter2-secret-pw@cache:port/0",  # a port that is not a number
        "redis://",  # no host
    ],
)
def test_a_malformed_redis_url_is_refused_in_one_line_without_the_password(url):
    with socket.socket() as taken, tempfile.TemporaryDirectory() as cwd:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        # The port is taken: a server that got past the checks stops when it tries to bind.
        port = str(taken.getsockname()[1])
        result = subprocess.run(
            [sys.executable, "-m", "appliance", "serve", "--host", "127.0.0.1", "--port", port],
            cwd=cwd,
            env={"PATH": os.environ.get("PATH", ""), "HOME": cwd, **TOKENS, "REDIS_URL": url},
            capture_output=True,
            text=True,
            timeout=timeout(30),
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and "hunter2" not in output, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsbridge: invalid configuration: REDIS_URL: "), output
