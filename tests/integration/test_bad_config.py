"""``wsbridge serve``'s own output: a configuration it cannot use gives one clear line, no traceback, no
secret; Ctrl+C in the terminal (the README's quick start) ends it without a traceback."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

from tests.support import free_port, timeout, wait_until

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


def test_ctrl_c_stops_the_server_without_a_traceback(tmp_path):
    # Started from a Python process, SIGINT is not ignored: the appliance gets it as a terminal's Ctrl+C does.
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **TOKENS},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: "Application startup complete" in log.read_text(), 30, "the appliance to start")
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=timeout(20))
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert "Shutting down" in output, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert code in (0, 130), output


@pytest.mark.parametrize(
    ("setting", "value"),
    [("SSM_ENDPOINT_URL", "not-a-url"), ("AWS_REGION", "no such region!")],
)
def test_an_unusable_ssm_setting_is_refused_in_one_line(tmp_path, setting, value):
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "TOKEN_STORE": "ssm",
        "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        setting: value,
    }
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "serve", "--host", "127.0.0.1", "--port", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout(60),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsbridge: cannot load tokens from the ssm store: "), output
    assert setting in lines[0], output


def test_the_banners_try_it_command_runs_from_the_same_shell(tmp_path):
    """`python3 dev.py serve` does not put .venv/bin on PATH: the banner names a wsbridge that exists."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "appliance", "serve", "--host", "127.0.0.1", "--port", str(taken.getsockname()[1])],
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **TOKENS},
            capture_output=True,
            text=True,
            timeout=timeout(30),
        )
    line = next(line for line in result.stdout.splitlines() if "Try it" in line)
    program = line.split()[2]
    found = shutil.which(program, path="/usr/bin:/bin") if "/" not in program else program
    assert found and os.access(found, os.X_OK), line
    assert line.split()[3] == "send", line
