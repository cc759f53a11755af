"""The dashboard's CSRF secret: shared where instances share a seed, never guessable."""

from __future__ import annotations

import hashlib
import hmac

from appliance.settings import Settings
from ui import _csrf_secret


def _derived(seed: str) -> str:
    return hmac.new(seed.encode(), b"wsbridge dashboard csrf", hashlib.sha256).hexdigest()


def test_without_an_admin_token_or_a_shared_seed_the_secret_is_random_not_the_instance_id() -> None:
    settings = Settings(_env_file=None, instance_id="host-1234", token_store="ssm", aws_region="eu-west-1")
    first, second = _csrf_secret(settings), _csrf_secret(settings)
    assert first != _derived("host-1234")  # hostname-pid is guessable
    assert first != second


def test_instances_sharing_the_admin_token_or_a_seed_share_the_secret() -> None:
    settings = Settings(_env_file=None, admin_token="an-admin-token-0123456789")
    assert _csrf_secret(settings) == _csrf_secret(settings) == _derived("an-admin-token-0123456789")
    assert _csrf_secret(settings, "seed-from-redis") == _derived("seed-from-redis")


def _sign_in_cookies(public_url: str | None, base_url: str) -> list[str]:
    import re

    from litestar.testing import TestClient

    from appliance.app import create_app

    admin = "an-admin-token-0123456789"
    settings = Settings(
        _env_file=None, llm_secret_token="c" * 32, unity_client_token="u" * 32, admin_token=admin, public_url=public_url
    )
    with TestClient(create_app(settings), base_url=base_url) as client:
        page = client.get("/admin/login")
        csrf = re.search(r'name="_csrf_token" value="([^"]+)"', page.text)
        assert csrf, page.text
        answer = client.post(
            "/admin/login", data={"token": admin, "_csrf_token": csrf.group(1)}, follow_redirects=False
        )
        assert answer.status_code == 303, answer.text
        return page.headers.get_list("set-cookie") + answer.headers.get_list("set-cookie")


def test_the_dashboards_cookies_are_secure_where_browsers_reach_it_over_https() -> None:
    # Litestar marks them Secure by the request's scheme; behind Traefik uvicorn takes it from
    # X-Forwarded-Proto (FORWARDED_ALLOW_IPS in the compose file), so the browser's https decides.
    over_https = _sign_in_cookies("https://bridge.example.com", "https://testserver.local")
    assert {c.split("=", 1)[0] for c in over_https} >= {"wsb_session", "wsb_csrf"}
    for cookie in over_https:
        assert "; secure" in cookie.lower(), cookie
    # A dashboard on plain http (development, a tunnel) still signs in.
    for cookie in _sign_in_cookies(None, "http://testserver.local"):
        assert "; secure" not in cookie.lower(), cookie
