"""What every ``jobs/*.py`` entrypoint shares: argv parsing, logging, exit codes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from raylm.config import ConfigError, load


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``a.yaml b.yaml train.lr=1e-4`` -> (config files, dotlist overrides)."""
    files = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    return files, overrides


def load_from_argv(job: str, argv: Sequence[str] | None) -> Any:
    files, overrides = split_argv(sys.argv[1:] if argv is None else argv)
    return load(job, files, overrides)


def entrypoint(main: Callable[[list[str] | None], int]) -> NoReturn:
    """Run a job's ``main``; a bad config exits 2 with a one-line message, not a traceback."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        code = main(None)
    except ConfigError as err:
        print(f"raylm: config error: {err}", file=sys.stderr)
        code = 2
    sys.exit(code)
