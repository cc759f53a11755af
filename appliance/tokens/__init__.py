"""Tokens: the store contract and its backends (env, SSM), rotation and eviction (:mod:`.service`).

Only the contract is imported here: the SSM backend imports boto3, which the env
store never needs, and the service imports the relay.
"""

from __future__ import annotations

from ..settings import Settings
from .base import Grant, RotationUnavailable, TokenStore, TokenStoreError, TokenStoreNotStarted, TokenStoreUnavailable

__all__ = [
    "Grant",
    "RotationUnavailable",
    "TokenStore",
    "TokenStoreError",
    "TokenStoreNotStarted",
    "TokenStoreUnavailable",
    "make_token_store",
]


def make_token_store(settings: Settings) -> TokenStore:
    """The configured store, not loaded yet (call ``load()``; it raises :class:`TokenStoreUnavailable`)."""
    if settings.token_store == "ssm":
        from .ssm import SsmTokenStore

        return SsmTokenStore(
            settings.ssm_prefix,
            region=settings.aws_region,
            endpoint_url=settings.ssm_endpoint_url,
            grace_seconds=settings.token_grace_seconds,
        )
    from .env import EnvTokenStore

    return EnvTokenStore(settings)
