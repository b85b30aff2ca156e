"""fewstep's messages through the standard :mod:`logging` module.

Library code logs to ``logging.getLogger(__name__)`` (a child of the ``fewstep`` logger) and never
prints; whoever runs it decides where messages go. The ``fewstep`` command calls :func:`setup_logging`
once: a rich handler on stderr, INFO by default (``--quiet``: warnings and errors only; ``--verbose``:
debug messages too), and silent on every process but rank 0 of a multi-process launch, so a message
is printed once however many GPUs run. A sweep member run as a subprocess logs plain lines to its
stdout (``worker.log``) with :func:`setup_plain_logging`.

Python users see nothing below WARNING unless they configure logging themselves, e.g.
``logging.basicConfig(level=logging.INFO)``.
"""
from __future__ import annotations

import logging
import os
import sys

ROOT = "fewstep"


class RankZeroFilter(logging.Filter):
    """Pass records only on the process of global rank 0 (``$RANK``, 0 when unset)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return int(os.environ.get("RANK", "0")) == 0


class MessageFormatter(logging.Formatter):
    """``message``, with ``warning:`` / ``error:`` in front of warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


def _install(handler: logging.Handler, level: int) -> logging.Logger:
    logger = logging.getLogger(ROOT)
    for old in [h for h in logger.handlers if getattr(h, "_fewstep", False)]:
        logger.removeHandler(old)
    handler._fewstep = True   # type: ignore[attr-defined]  (ours: replaced, never duplicated, on a second setup)
    handler.addFilter(RankZeroFilter())
    logger.addHandler(handler)
    logger.setLevel(level)
    return logger


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Send the ``fewstep`` loggers to a rich handler on stderr at ``level`` (rank 0 only).

    Messages are printed as plain text (rich markup off, so ``fewstep[hf]`` or ``[1, 2]`` in a message
    survive), without time stamps or paths: one line per message, like a CLI's own output.
    """
    from rich.console import Console
    from rich.logging import RichHandler

    handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False, show_level=False,
                          markup=False, highlighter=None, rich_tracebacks=False)
    handler.setFormatter(MessageFormatter("%(message)s"))
    return _install(handler, level)


def setup_plain_logging(level: int = logging.INFO, stream=None) -> logging.Logger:
    """Plain ``message`` lines on ``stream`` (stdout by default), flushed per line: sweep workers' logs."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(MessageFormatter("%(message)s"))
    return _install(handler, level)
