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
