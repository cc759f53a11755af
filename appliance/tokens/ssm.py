"""Tokens in AWS SSM Parameter Store (``SecureString``, read ``WithDecryption``) through boto3.

Layout under the prefix (default ``/WebSocket/prod/``): ``LLM_SECRET_TOKEN``,
``UNITY_CLIENT_TOKEN``, ``ADMIN_TOKEN`` (optional), ``VIEWER_TOKEN`` (optional), and
scoped client tokens ``client_tokens/<name>`` whose value is the JSON object
``{"ids": "<glob>", "groups": ["<group>", ...], "token": "<token>"}`` (``groups`` optional:
absent, the token joins no group). Named controller and admin tokens,
``controller_tokens/<name>`` and ``admin_tokens/<name>``, hold the token itself; their holder
acts as ``<name>``. Other names under the prefix (``REDIS_PASSWORD``) are not tokens and are ignored.

Rotation keeps its state in SSM itself, so every instance (and a restarted one)
reads the same answer: the outgoing version carries the label ``previous`` (and
``keep-connections`` if the operator keeps its connections), the new one ``current``.
A version labelled ``previous`` is accepted only while it is the version right before
the latest, until the latest version's modification time plus the grace window; a
manual overwrite therefore never revives an old token. Revocation removes the labels.

Credentials come from boto3's default chain (the instance profile in production);
calls are blocking and run in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .. import metrics
from .base import (
    GROUP_NAME,
    ID_PATTERN,
    SCOPED_PREFIX,
    TokenState,
    TokenStore,
    TokenStoreError,
    TokenStoreUnavailable,
    TokenVersion,
    role_of,
)

__all__ = ["KEEP_LABEL", "PREVIOUS_LABEL", "CURRENT_LABEL", "SsmTokenStore"]

log = logging.getLogger(__name__)
# botocore says at INFO where it found credentials, on every start: noise next to our own one-line errors.
logging.getLogger("botocore").setLevel(logging.WARNING)

CURRENT_LABEL = "current"
PREVIOUS_LABEL = "previous"
KEEP_LABEL = "keep-connections"
REQUIRED = ("LLM_SECRET_TOKEN", "UNITY_CLIENT_TOKEN")
#: SSM keeps this many versions of a parameter.
MAX_VERSIONS = 100
#: GetParameters takes at most 10 names per call.
_BATCH = 10


def _describe(exc: Exception) -> str:
    """An AWS error as one line without values: the error code and AWS's message, or botocore's."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', 'ClientError')}: {error.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


class SsmTokenStore(TokenStore):
    name = "ssm"
    rotatable = True

    def __init__(
        self,
        prefix: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        grace_seconds: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(clock)
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.grace_seconds = grace_seconds
        self.last_error: str | None = None
        self.last_success: float | None = None
        config = Config(
            connect_timeout=3,
            read_timeout=10,
            retries={"max_attempts": 3, "mode": "standard"},
            user_agent_extra="wsbridge",
        )
        try:
            self._ssm = boto3.session.Session().client(
                "ssm", region_name=region, endpoint_url=endpoint_url, config=config
            )
        except BotoCoreError as exc:  # NoRegionError, mostly: say which setting fixes it.
            raise TokenStoreUnavailable(f"cannot create the SSM client ({_describe(exc)}); set AWS_REGION") from exc
        except ValueError as exc:  # botocore: "Invalid endpoint: ..."
            raise TokenStoreUnavailable(
                f"cannot create the SSM client ({exc}); SSM_ENDPOINT_URL must be an http(s):// URL"
            ) from exc

    def describe(self) -> str:
        return f"ssm:{self.prefix}"

    # --- reading ----------------------------------------------------------------------------

    def load(self) -> None:
        self._publish(self._read())
        self._succeeded()

    async def refresh(self) -> bool:
        try:
            states = await asyncio.to_thread(self._read)
        except TokenStoreUnavailable as exc:
            self.last_error = str(exc)
            metrics.TOKEN_REFRESH_FAILURES.inc()
            metrics.TOKEN_STORE_UP.set(0)
            log.warning("Token refresh from SSM failed; keeping the last good tokens: %s", exc)
            return False
        self._publish(states)
        self._succeeded()
        return True

    def _succeeded(self) -> None:
        if self.last_error is not None:
            log.info("Token refresh from SSM works again")
        self.last_error = None
        self.last_success = self.clock()
        metrics.TOKEN_STORE_UP.set(1)
        metrics.TOKEN_LAST_REFRESH.set(self.last_success)

    def health(self) -> dict[str, Any]:
        detail: dict[str, Any] = {"store": self.describe(), "ok": self.last_error is None}
        if self.last_success is not None:
            detail["last_refresh"] = round(self.last_success, 3)
        if self.last_error is not None:
            detail["error"] = f"last refresh failed, serving the last good tokens: {self.last_error}"
        return detail

    def _read(self) -> dict[str, TokenState]:
        try:
            current = self._current_parameters()
            previous = self._labelled(list(current), PREVIOUS_LABEL)
            kept = self._labelled(list(current), KEEP_LABEL)
        except (BotoCoreError, ClientError) as exc:
            raise TokenStoreUnavailable(f"cannot read {self.prefix} from SSM ({_describe(exc)})") from exc
        missing = [self.prefix + name for name in REQUIRED if name not in current]
        if missing:
            raise TokenStoreUnavailable(f"missing SSM parameter(s): {', '.join(missing)}")
        states: dict[str, TokenState] = {}
        for name, parameter in current.items():
            latest = self._version(name, parameter)
            if latest is None:
                continue
            state = TokenState(name, role_of(name) or "", latest)
            outgoing = previous.get(name)
            # Only the version right before the latest is a rotation's previous version (see the module doc).
            if outgoing is not None and outgoing["Version"] == parameter["Version"] - 1 and latest.modified_at:
                old = self._version(name, outgoing)
                if old is not None:
                    keep = name in kept and kept[name]["Version"] == outgoing["Version"]
                    state = TokenState(
                        name, state.role, latest, old, latest.modified_at + self.grace_seconds, keep_connections=keep
                    )
            states[name] = state
        return states

    def _current_parameters(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        paginator = self._ssm.get_paginator("get_parameters_by_path")
        for page in paginator.paginate(Path=self.prefix.rstrip("/") or "/", Recursive=True, WithDecryption=True):
            for parameter in page["Parameters"]:
                name = parameter["Name"][len(self.prefix) :]
                if parameter["Name"].startswith(self.prefix) and role_of(name) is not None:
                    found[name] = parameter
        return found

    def _labelled(self, names: list[str], label: str) -> dict[str, dict[str, Any]]:
        """The versions of ``names`` carrying ``label`` (GetParameters with ``name:label`` selectors)."""
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(names), _BATCH):
            selectors = [f"{self.prefix}{name}:{label}" for name in names[start : start + _BATCH]]
            answer = self._ssm.get_parameters(Names=selectors, WithDecryption=True)
            for parameter in answer["Parameters"]:
                found[parameter["Name"].split(":", 1)[0][len(self.prefix) :]] = parameter
        return found

    def _version(self, name: str, parameter: dict[str, Any]) -> TokenVersion | None:
        modified = parameter.get("LastModifiedDate")
        modified_at = modified.timestamp() if modified is not None else None
        value, pattern, groups = parameter["Value"], None, None
        if name.startswith(SCOPED_PREFIX):
            try:
                data = json.loads(value)
                value, pattern, groups = data["token"], data["ids"], data.get("groups", [])
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning(
                    'Ignoring %s%s: expected {"ids": "<glob>", "groups": [...], "token": "<token>"}', self.prefix, name
                )
                return None
            if not isinstance(value, str) or not isinstance(pattern, str) or not ID_PATTERN.match(pattern):
                log.warning("Ignoring %s%s: ids must be a glob over [A-Za-z0-9_-*?]", self.prefix, name)
                return None
            if not isinstance(groups, list) or not all(
                isinstance(group, str) and GROUP_NAME.fullmatch(group) for group in groups
            ):
                log.warning("Ignoring %s%s: groups must be a list of names over [A-Za-z0-9_-]", self.prefix, name)
                return None
            groups = tuple(groups)
        if not value:
            return None
        return TokenVersion(int(parameter["Version"]), value, modified_at, pattern, groups)

    # --- rotation (blocking; the service runs these in a thread) -----------------------------

    def write_rotation(self, name: str, value: str, keep_connections: bool) -> int:
        """Store ``value`` as the new version of ``name``; the outgoing one becomes ``previous``."""
        if role_of(name) is None:
            raise TokenStoreError(f"{name!r} is not a token name")
        full = self.prefix + name
        try:
            try:
                existing = self._ssm.get_parameter(Name=full, WithDecryption=True)["Parameter"]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "ParameterNotFound":
                    raise TokenStoreError(f"no SSM parameter {full}") from exc
                raise
            stored = value
            if name.startswith(SCOPED_PREFIX):
                old = self._version(name, existing)
                if old is None:
                    raise TokenStoreError(f"{full} is not a valid scoped token; fix it before rotating")
                scope: dict[str, Any] = {"ids": old.id_pattern}
                if old.groups:
                    scope["groups"] = list(old.groups)
                stored = json.dumps({**scope, "token": value})
            # Label the outgoing version before the new one exists: while it is still the latest,
            # readers ignore a "previous" on it, and once the new version lands they see a rotation
            # at once, never a moment without a grace window.
            labels = [PREVIOUS_LABEL] + ([KEEP_LABEL] if keep_connections else [])
            self._ssm.label_parameter_version(Name=full, ParameterVersion=existing["Version"], Labels=labels)
            if not keep_connections:
                self._unlabel(full, KEEP_LABEL)
            version = self._put(full, stored)
            self._ssm.label_parameter_version(Name=full, ParameterVersion=version, Labels=[CURRENT_LABEL])
            return version
        except (BotoCoreError, ClientError) as exc:
            raise TokenStoreUnavailable(f"rotation of {full} failed ({_describe(exc)})") from exc

    def _put(self, full: str, stored: str) -> int:
        history = [
            entry
            for page in self._ssm.get_paginator("get_parameter_history").paginate(Name=full, WithDecryption=False)
            for entry in page["Parameters"]
        ]
        latest = max(history, key=lambda entry: entry["Version"])
        oldest = min(history, key=lambda entry: entry["Version"])
        put: dict[str, Any] = {"Name": full, "Value": stored, "Type": "SecureString", "Overwrite": True}
        if latest.get("KeyId"):  # Keep the parameter's KMS key: without KeyId, SSM would use the account default.
            put["KeyId"] = latest["KeyId"]
        # SSM keeps 100 versions and deletes the oldest on overwrite, but refuses while that one carries
        # a label. Our labels sit on the newest versions; move any stale one off first.
        if len(history) >= MAX_VERSIONS and oldest.get("Labels"):
            log.warning("%s has %d versions; removing labels %s from the oldest", full, len(history), oldest["Labels"])
            self._ssm.unlabel_parameter_version(Name=full, ParameterVersion=oldest["Version"], Labels=oldest["Labels"])
        return int(self._ssm.put_parameter(**put)["Version"])

    def _unlabel(self, full: str, label: str) -> int | None:
        """Remove ``label`` from whichever version has it; that version, or None."""
        try:
            version = self._ssm.get_parameter(Name=f"{full}:{label}")["Parameter"]["Version"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("ParameterNotFound", "ParameterVersionLabelNotFound"):
                return None
            raise
        self._ssm.unlabel_parameter_version(Name=full, ParameterVersion=version, Labels=[label])
        return int(version)

    def end_grace(self, name: str) -> int | None:
        """Revocation: the previous version of ``name`` is refused from now on; returns it, if any."""
        if role_of(name) is None:
            raise TokenStoreError(f"{name!r} is not a token name")
        full = self.prefix + name
        try:
            self._unlabel(full, KEEP_LABEL)
            return self._unlabel(full, PREVIOUS_LABEL)
        except (BotoCoreError, ClientError) as exc:
            raise TokenStoreUnavailable(f"revocation of {full} failed ({_describe(exc)})") from exc
