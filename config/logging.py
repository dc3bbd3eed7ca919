"""One logging set-up for every entry point (the server, the CLI), through loguru.

`diagnose=False` everywhere: loguru's default handler prints the values of local variables in
tracebacks, which may hold API keys, access tokens or a caller's phone number.
"""

from __future__ import annotations

import sys

from loguru import logger


def configure_logging(level: str) -> None:
    logger.remove()
    logger.add(sys.stderr, level=level.upper(), diagnose=False, backtrace=False)
