"""The serve job's ``filters`` and ``logging`` groups (kept apart from ``config.py``,
which holds the groups every deployment sets)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from raylm.config import ConfigError, resolve_path


@dataclass
class ServeFiltersConfig:
    """Optional input and output filters (``raylm.serve.filters``), the data job's own
    blocklist matcher and PII scrubber."""

    blocklist: list[str] = field(default_factory=list)
    """Files of blocked words or phrases, one a line (``#`` starts a comment), as the data
    job's ``filters.blocklist``: a prompt holding one gets 400 ``content_filter``."""

    output: bool = True
    """Also check completions against ``blocklist``: a blocked choice's text is withheld
    (``finish_reason: content_filter``), and ``stream: true`` is refused with 400."""

    pii: bool = False
    """Replace e-mails, phones, IPs, card and ID numbers in prompts with placeholders
    (``<EMAIL>``, ...) before the engine sees them (the data job's ``pii`` scrubber)."""

    def __post_init__(self) -> None:
        # Replicas run elsewhere: resolve against the workspace now, and fail before deploy.
        self.blocklist = [resolve_path(str(p)) for p in self.blocklist]
        for path in self.blocklist:
            if "://" not in path and not os.path.isfile(path):
                raise ConfigError(f"filters.blocklist: {path!r} is not a file")


@dataclass
class ServeLoggingConfig:
    """The access log: one JSON line per request from each replica (``raylm.serve.guards``)."""

    access: bool = True
    """Write it: time, key digest prefix, route, model, status, tokens, latency, replica."""

    prompts: bool = False
    """Also log each request's prompt (messages, prompt or input). Off by default: prompts
    may hold personal data, and logs are kept and copied more widely than requests."""
