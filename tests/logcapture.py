"""Collect the messages fewstep's library code logs (``logging.getLogger("fewstep...")``) in a test."""
from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def captured(name: str = "fewstep", level: int = logging.INFO):
    """Yield a list that fills with the messages of logger ``name`` (and its children) at ``level`` and above."""
    lines: list[str] = []
    handler = logging.Handler(level)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger(name)
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
