# syntax=docker/dockerfile:1
# The WebSocket Bridge appliance image.
#
# Two stages on the same pinned slim base: the first installs the project and its
# locked dependencies (requirements/server.lock, hash-checked) into a virtualenv
# (every dependency ships manylinux wheels, so no compiler is needed, and none
# reaches the final image); the second copies only that virtualenv and runs it as
# an unprivileged user.
#
#   docker build -t wsbridge:2.0.0 .
#   docker run --rm -p 8000:8000 -e LLM_SECRET_TOKEN=... -e UNITY_CLIENT_TOKEN=... wsbridge:2.0.0

FROM python:3.11.13-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv

WORKDIR /src
# The locked dependencies first (every version pinned, every file hash-checked): their
# layer is cached until the lock changes.
COPY requirements/server.lock ./requirements/
RUN /opt/venv/bin/pip install --no-compile --require-hashes -r requirements/server.lock
# README.md is the package's long description (pyproject.toml `readme`).
COPY pyproject.toml README.md ./
COPY appliance ./appliance
COPY ui ./ui
# A regular (not editable) install without resolving again: the final image needs no
# source tree, and nothing but the lock decides a version.
RUN /opt/venv/bin/pip install --no-compile --no-deps . \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib


FROM python:3.11.13-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="websocket-bridge" \
      org.opencontainers.image.description="WebSocket relay between LLM controllers and game/device clients" \
      org.opencontainers.image.licenses="MIT"

# A fixed uid/gid so volume ownership and audits do not depend on build order.
RUN groupadd --system --gid 10001 wsbridge \
    && useradd --system --uid 10001 --gid wsbridge --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin wsbridge

COPY --from=build /opt/venv /opt/venv

# BIND_HOST=0.0.0.0: inside a container the loopback default would be unreachable.
# /app belongs to root: the appliance needs no writable directory, and with no token
# configured it cannot silently write dev tokens to ./.env, so it fails instead.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BIND_HOST=0.0.0.0 \
    WEB_SOCKET_PORT=8000
WORKDIR /app
USER 10001:10001

EXPOSE 8000

# SIGTERM makes the appliance close every socket with 1001 (going away) and exit
# within SHUTDOWN_GRACE (10 s); the orchestrator's stop grace period (30 s in
# docker-compose.prod.yml) must be longer than that.
STOPSIGNAL SIGTERM

# Liveness on /healthz with the image's own Python (no curl in a slim image).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('WEB_SOCKET_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status == 200 else 1)"]

# Exec form, no shell in between: the appliance itself is PID 1 and receives SIGTERM.
CMD ["wsbridge", "serve"]
