"""Ray's token authentication, from raylm's clients: the one place raylm's base layer
reaches into Ray's private modules (the serve layer's is ``raylm.serve.ray_llm``).

Ray 2.60 offers no public call that switches a plain client (a JobSubmissionClient, an
HTTP GET to the dashboard) into token mode; ``ray start`` and ``ray.init`` do it for
their own process with the functions below. Written for Ray 2.60; the unit test
``tests/unit/test_ray_auth.py`` imports them and names that version when they move.
"""

from __future__ import annotations

RAY_VERSION = "2.60"
"""The Ray release these private imports were written against."""


def use_token_auth_if_configured() -> None:
    """Send Ray's auth token from this process when the machine has one.

    Ray 2.60 starts clusters with token auth whenever ``~/.ray/auth_token`` exists (and a
    local ``ray.init()`` creates that file), and ``ray start`` / ``ray.init`` switch
    their own process to token mode. A plain JobSubmissionClient does not, and gets 401;
    this does what they do, before any dashboard call.
    """
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def auth_headers() -> dict[str, str]:
    """The ``Authorization`` header Ray's dashboard expects, or {} when auth is off."""
    from ray._private.authentication.http_token_authentication import (
        get_auth_headers_if_auth_enabled,
    )

    use_token_auth_if_configured()
    return get_auth_headers_if_auth_enabled({})
