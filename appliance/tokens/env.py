"""The embedded token store: tokens from the environment and ``./.env`` through the settings.

The default, and the original bridge's behaviour: the values are fixed for the life
of the process (version 1), nothing AWS is imported or contacted, and rotation
means changing ``.env`` and restarting.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pydantic import SecretStr

from ..settings import Settings
from .base import ROLE_BY_NAME, TokenState, TokenStore, TokenStoreUnavailable, TokenVersion

__all__ = ["EnvTokenStore"]


class EnvTokenStore(TokenStore):
    name = "env"

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock)
        self._values: dict[str, SecretStr | None] = {
            "LLM_SECRET_TOKEN": settings.llm_secret_token,
            "UNITY_CLIENT_TOKEN": settings.unity_client_token,
            "ADMIN_TOKEN": settings.admin_token,
            # The dashboard's read-only token, once its setting exists.
            "VIEWER_TOKEN": getattr(settings, "viewer_token", None),
        }

    def load(self) -> None:
        if self._values["LLM_SECRET_TOKEN"] is None or self._values["UNITY_CLIENT_TOKEN"] is None:
            raise TokenStoreUnavailable("LLM_SECRET_TOKEN and UNITY_CLIENT_TOKEN must both be set")
        self._publish(
            {
                name: TokenState(name, ROLE_BY_NAME[name], TokenVersion(1, secret.get_secret_value()))
                for name, secret in self._values.items()
                if secret is not None and secret.get_secret_value()
            }
        )
