"""OpenID Connect sign-in to the dashboard (ui/oidc.py): a part of :class:`appliance.settings.Settings`.

Off unless ``OIDC_ISSUER`` is set; then the client id, ``OIDC_REDIRECT_BASE_URL`` or ``PUBLIC_URL``
(the redirect URI is built from it, never from a request's Host header) and at least one allow-list are required, so a half-done
configuration fails at start instead of letting anybody in or nobody.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings

__all__ = ["DashboardOidc"]

_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


#: Only ASCII letters ignore case: casefold() and lower() also fold look-alikes (the Kelvin sign to k,
#: the long s to s), so a name chosen at the provider could become a listed one.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _fold(value: str) -> str:
    return value.translate(_ASCII_LOWER)


def _names(value: str) -> frozenset[str]:
    """A comma-separated list as the set of its entries, ASCII letters lowered (emails compare case-insensitively)."""
    return frozenset(_fold(item.strip()) for item in value.split(",") if item.strip())


class DashboardOidc(BaseSettings):
    """Who may sign in to the dashboard through the company's identity provider, and as what."""

    oidc_issuer: str | None = Field(
        None,
        description="OpenID Connect issuer URL (https://login.example.com/realms/ops); its "
        "/.well-known/openid-configuration is read at the first sign-in. Unset: no single sign-on.",
    )
    oidc_client_id: str | None = Field(None, description="The dashboard's client id at the OIDC provider.")
    oidc_client_secret: SecretStr | None = Field(
        None, description="The client secret (confidential client); a secret: never logged or shown."
    )
    oidc_redirect_base_url: str | None = Field(
        None,
        description="Where browsers reach the dashboard, for the redirect URI <this>/admin/login/oidc/callback "
        "registered at the provider (https://DOMAIN_NAME:8443 in the compose stack); unset: PUBLIC_URL.",
    )
    oidc_provider_name: str = Field(
        "single sign-on", max_length=60, description="Shown on the sign-in page: `Sign in with <name>`."
    )
    oidc_scopes: str = Field("openid email profile", description="Scopes asked for; `openid` is always included.")
    oidc_name_claims: str = Field(
        "email,preferred_username",
        description="ID-token claims that name the operator in the audit trail, the first present wins; it is "
        "what OIDC_ADMINS and OIDC_VIEWERS list.",
    )
    oidc_admins: str = Field("", description="Comma-separated names (per OIDC_NAME_CLAIMS) that sign in as admin.")
    oidc_viewers: str = Field("", description="Comma-separated names that sign in read-only (viewer).")
    oidc_groups_claim: str | None = Field(
        None, description="ID-token claim holding the person's groups (e.g. `groups`), for OIDC_*_GROUPS."
    )
    oidc_admin_groups: str = Field("", description="Comma-separated groups whose members sign in as admin.")
    oidc_viewer_groups: str = Field("", description="Comma-separated groups whose members sign in as viewer.")

    @property
    def oidc_enabled(self) -> bool:
        return bool(self.oidc_issuer)

    @model_validator(mode="after")
    def _oidc_complete(self) -> DashboardOidc:
        if not self.oidc_issuer:
            return self
        issuer = urlsplit(self.oidc_issuer)
        if issuer.scheme != "https" and not (issuer.scheme == "http" and issuer.hostname in _LOCAL_HOSTS):
            raise ValueError("OIDC_ISSUER must be an https:// URL (http:// only for localhost)")
        if not self.oidc_client_id:
            raise ValueError("OIDC_ISSUER needs OIDC_CLIENT_ID")
        public = urlsplit(self.oidc_redirect_base() or "")
        if public.scheme not in ("http", "https") or not public.hostname:
            raise ValueError(
                "OIDC_ISSUER needs OIDC_REDIRECT_BASE_URL or PUBLIC_URL (https://ops.example.com): "
                "the redirect URI is built from it, never from a request's Host header"
            )
        if not (self.oidc_admins or self.oidc_viewers or self.oidc_admin_groups or self.oidc_viewer_groups):
            raise ValueError("OIDC_ISSUER needs OIDC_ADMINS, OIDC_VIEWERS or OIDC_*_GROUPS: nobody could sign in")
        if (self.oidc_admin_groups or self.oidc_viewer_groups) and not self.oidc_groups_claim:
            raise ValueError("OIDC_ADMIN_GROUPS / OIDC_VIEWER_GROUPS need OIDC_GROUPS_CLAIM")
        return self

    def oidc_redirect_base(self) -> str | None:
        """Where the redirect URI starts: OIDC_REDIRECT_BASE_URL, else PUBLIC_URL."""
        settings: Any = self
        return (self.oidc_redirect_base_url or settings.public_url or "").rstrip("/") or None

    def oidc_role(self, name: str, groups: list[str]) -> str | None:
        """The dashboard role of the person named ``name`` in ``groups``: admin, viewer, or None (refused)."""
        key, member = _fold(name), {_fold(str(group)) for group in groups}
        if key in _names(self.oidc_admins) or member & _names(self.oidc_admin_groups):
            return "admin"
        if key in _names(self.oidc_viewers) or member & _names(self.oidc_viewer_groups):
            return "viewer"
        return None

    def oidc_session_version(self) -> str:
        """What OIDC sessions are checked against: another provider, client or allow-list ends them all."""
        what = "|".join(
            [
                self.oidc_issuer or "",
                self.oidc_client_id or "",
                self.oidc_name_claims,
                self.oidc_admins,
                self.oidc_viewers,
                self.oidc_groups_claim or "",
                self.oidc_admin_groups,
                self.oidc_viewer_groups,
            ]
        )
        return hashlib.sha256(b"wsbridge dashboard oidc\0" + what.encode()).hexdigest()[:16]
