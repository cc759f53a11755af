"""rediss:// with AUTH, as ElastiCache serves it: a real redis-server on TLS only, two real appliances.

The CA and the server's certificate are made here (throwaway, in-process with ``cryptography``);
the appliances verify the server with ``REDIS_TLS_CA_FILE``. A wrong CA must leave an appliance
not ready with a clear reason in its log, and the password nowhere (the session's leak scan).
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support import Appliance, command, free_port, recv, recv_json, wait_until

PASSWORD = "tls-redis-pass-5d1c8e2a"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(directory: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def make_server_cert(directory: Path, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("redis.test"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(_pem(key))


class TlsRedis:
    """redis-server with TLS only (``--port 0``) and a password, on a free port."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, password: str = PASSWORD) -> str:
        return f"rediss://:{password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server not found: run the tests through `python3 dev.py test`"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(self.dir / "server.pem"),
                "--tls-key-file",
                str(self.dir / "server.key"),
                "--tls-ca-cert-file",
                str(self.dir / "ca.pem"),
                "--tls-auth-clients",
                "no",  # ElastiCache authenticates clients by AUTH, not by certificate.
                "--requirepass",
                PASSWORD,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, 10, f"redis-server with TLS on port {self.port}")

    def _answers(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.dir / "ca.pem"))
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
            ):
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"-NOAUTH")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[TlsRedis]:
    directory = Path(tempfile.mkdtemp(prefix="wsb-redis-tls-"))
    ca_key, ca = make_ca(directory, "ca")
    make_server_cert(directory, ca_key, ca)
    make_ca(directory, "other-ca")  # Signed nothing the server shows: the wrong CA.
    server = TlsRedis(directory)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


async def test_commands_relay_between_two_appliances_over_rediss_with_auth(tls_redis: TlsRedis, start_appliance):
    env = {"REDIS_URL": tls_redis.url(), "REDIS_TLS_CA_FILE": str(tls_redis.dir / "ca.pem")}
    a: Appliance = start_appliance(env, name="tls-a")  # Waits for /readyz 200.
    b: Appliance = start_appliance(env, name="tls-b")
    assert (await a.aget("/readyz"))[0] == 200 and (await b.aget("/readyz"))[0] == 200
    async with a.controller() as controller, b.connect("unity_tls_1") as client:
        await controller.send(command("unity_tls_1", "MoveForward 10"))
        assert await recv(client) == "MoveForward 10"
        await client.send("done")
        assert await recv_json(controller) == {"sender": "unity_tls_1", "message": "done"}


def test_a_wrong_ca_leaves_the_appliance_not_ready_with_a_clear_reason(tls_redis: TlsRedis, start_appliance):
    env = {"REDIS_URL": tls_redis.url(), "REDIS_TLS_CA_FILE": str(tls_redis.dir / "other-ca.pem")}
    app: Appliance = start_appliance(env, name="tls-wrong-ca", wait_ready=False)
    wait_until(
        lambda: "TLS certificate verify failed, check REDIS_TLS_CA_FILE" in app.log(), 20, "the TLS failure in the log"
    )
    status, body = app.get("/readyz")
    assert status == 503 and "TLS certificate verify failed" in str(body), body
    assert PASSWORD not in app.log()
