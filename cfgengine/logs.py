"""Third-party logging kept out of the user's way: a library's info and warning lines are not the
user's business when cfgengine reports what matters in one line of its own."""
from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def quiet_logger(name: str | None = None, level: int = logging.ERROR):
    """Raise logger `name` (None: the root logger) to `level` for the block, then restore it."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
