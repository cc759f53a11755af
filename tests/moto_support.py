"""A real moto server for the token-store tests: AWS SSM Parameter Store on a free loopback port.

moto clashes with the appliance's dependencies, so it runs from its tool virtualenv
(``WSBRIDGE_TOOL_VENVS``/moto, built by ``dev.py`` from ``tools/venvs/moto.txt``); the
appliance talks to it with its own boto3 through ``SSM_ENDPOINT_URL``. A missing tool
is a failure that says how to get it, never a skip.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from support import ROOT, free_port, timeout

REGION = "eu-central-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def moto_venv() -> Path:
    venv = Path(os.environ.get("WSBRIDGE_TOOL_VENVS") or ROOT / ".venv-tools") / "moto"
    if not (venv / "bin" / "moto_server").exists():
        pytest.fail(
            f"{venv}/bin/moto_server is missing: `python3 dev.py test` creates it from tools/venvs/moto.txt",
            pytrace=False,
        )
    return venv


class MotoServer:
    def __init__(self) -> None:
        self.venv = moto_venv()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> MotoServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "AWS_"))}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        self.process = subprocess.Popen(
            [self.venv / "bin" / "moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout(30)
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2):
                    return self
            except (urllib.error.URLError, ConnectionError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"moto_server did not start on {self.url}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self.process = None

    def ssm(self) -> Any:
        """A boto3 SSM client on this server (for seeding and inspecting parameters)."""
        return boto3.session.Session().client(
            "ssm",
            region_name=REGION,
            endpoint_url=self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def appliance_env(self, prefix: str, **extra: str) -> dict[str, str]:
        """Settings that make an appliance (or ``wsbridge tokens``) use this server's SSM under ``prefix``."""
        return {
            **CREDENTIALS,
            "TOKEN_STORE": "ssm",
            "SSM_PREFIX": prefix,
            "AWS_REGION": REGION,
            "SSM_ENDPOINT_URL": self.url,
            **extra,
        }


def unique_prefix() -> str:
    """A fresh parameter path per test, so tests sharing one server never see each other's tokens."""
    return f"/wsb-test/{uuid.uuid4().hex[:12]}/"


def seed(ssm: Any, prefix: str, values: dict[str, str]) -> None:
    for name, value in values.items():
        ssm.put_parameter(Name=prefix + name, Value=value, Type="SecureString", Overwrite=True)
