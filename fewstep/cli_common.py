"""What every ``fewstep`` command shares: the consoles, which errors are the user's and their one line,
JSON output files, the process's rank and world size, and the exit code after a signal."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import typer
from rich.console import Console

from fewstep.checkpoints import CheckpointError
from fewstep.config import ConfigError
from fewstep.data.base import DataError
from fewstep.files import describe_os_error, write_json
from fewstep.registry import RegistryError
from fewstep.train.guards import NonFiniteLossError

console = Console()
err = Console(stderr=True)

USER_ERRORS = (RegistryError, ConfigError, CheckpointError, DataError, OSError, ValueError, KeyError,
               NonFiniteLossError)
"""Errors that are about the user's input or machine: printed as one line (exit 2), never a traceback."""


def error_message(exc: BaseException) -> str:
    """The one line a user sees for an error: a file error as ``Permission denied (path)``, not
    ``[Errno 13] …``; a KeyError without its quotes."""
    if isinstance(exc, OSError) and not isinstance(exc, DataError):
        return describe_os_error(exc)
    return exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)


def fail(exc: BaseException) -> NoReturn:
    """Print ``error: <message>`` (plain text: brackets in messages are not rich markup) and exit 2."""
    err.print("error: ", style="bold red", end="", highlight=False)
    err.print(error_message(exc), markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def write_json_out(path: Optional[Path], body: dict, default: Callable[[Any], Any] | None = None) -> None:
    """Write a command's ``--out`` JSON (indented, atomically, parents created); nothing when ``path`` is None."""
    if path is not None:
        write_json(path, body, default=default)


def rank_and_world() -> tuple[int, int]:
    """This process's global rank and the number of processes (``RANK``/``WORLD_SIZE`` under torchrun and
    accelerate launch; 0 and 1 otherwise)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def exit_after(signal_name: str) -> typer.Exit:
    """The exit that a process killed by ``signal_name`` would have (``SIGTERM`` → 143, ``SIGINT`` → 130)."""
    return typer.Exit(128 + int(getattr(signal, signal_name, signal.SIGTERM)))
