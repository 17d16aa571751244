"""raylm's only private Ray imports outside serve: they must exist in the Ray it runs on."""

from __future__ import annotations

import ray

from raylm import ray_auth


def test_private_auth_functions_exist_in_this_ray() -> None:
    """Fails loudly on a Ray upgrade that moved them: revisit raylm/ray_auth.py."""
    try:
        from ray._private.authentication.authentication_token_setup import (  # noqa: F401
            maybe_enable_token_auth_if_token_available,
        )
        from ray._private.authentication.http_token_authentication import (  # noqa: F401
            get_auth_headers_if_auth_enabled,
        )
    except ImportError as err:
        raise AssertionError(
            f"raylm.ray_auth was written for Ray {ray_auth.RAY_VERSION}; Ray {ray.__version__} "
            f"moved its token-auth helpers ({err})"
        ) from None


def test_headers_carry_the_token_in_token_mode() -> None:
    """The suite runs in token mode (tests/conftest.py), so a header must come back."""
    headers = ray_auth.auth_headers()
    assert headers and next(iter(headers.values())).startswith("Bearer ")
