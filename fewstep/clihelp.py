"""Typer, made to show fewstep's commands the way people read them.

* Flags show as flags in ``--help`` (typer 0.29 prints a ``<bool>`` type after ``--dry-run``).
* Docstrings are reflowed: a line break inside a paragraph is a space, so help never breaks mid-sentence
  at the source's line width (blank lines still separate paragraphs).
* An unknown option that looks like a config field (``--warmup``) names the ``--set`` key to use.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup


def _set_hint(option: str) -> str:
    """``--set section.field=…`` for a config field that looks like an unknown flag (``--warmup`` →
    ``train.lr_warmup_kimg``), or ``""``."""
    import dataclasses

    from fewstep.config import DataConfig, SampleConfig, TrainConfig
    from fewstep.registry import closest

    fields = {f.name: f"{section}.{f.name}" for section, cls in (("train", TrainConfig), ("data", DataConfig),
                                                                ("sample", SampleConfig))
              for f in dataclasses.fields(cls)}
    word = option.lstrip("-").replace("-", "_")
    names = [n for n in fields if word and (n == word or n.startswith(word + "_") or n.endswith("_" + word))]
    names = names or closest(word, list(fields), n=1)
    return f"did you mean --set {fields[names[0]]}=VALUE?" if names else ""


# Typer 0.29 vendors click (typer._click); earlier versions use click itself. Both are duck-typed here.
def _flags_as_flags(params: list[Any]) -> list[Any]:
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""   # typer shows the metavar instead of a "<bool>" type
    return params


class FewstepCommand(TyperCommand):
    """Typer's command with two fixes: flags show as flags in ``--help`` (no ``<bool>`` type column),
    and an unknown option that names a config field says which ``--set`` key to use."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_as_flags(super().get_params(ctx))

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:
            if type(exc).__name__ != "NoSuchOption":
                raise
            hint = _set_hint(exc.option_name) if any(p.name == "set_" for p in self.params) else ""
            near = difflib.get_close_matches(exc.option_name, list(exc.possibilities or []), cutoff=0.8)
            if hint and not near:   # a config field beats a loose guess among the command's flags
                exc.message = f"No such option: {exc.option_name}; {hint}"
                exc.possibilities = None
            raise


class FewstepGroup(TyperGroup):
    """Typer's group with flags shown as flags in ``--help``."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_as_flags(super().get_params(ctx))


def reflow(text: str | None) -> str | None:
    """Join the lines of each paragraph of ``text`` (paragraphs are separated by blank lines)."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs)


def reflow_help(app: typer.Typer) -> None:
    """Use :class:`FewstepCommand` and reflowed docstrings for every command of ``app`` (and sub-apps)."""
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = FewstepCommand
        if info.help is None and info.callback is not None:
            info.help = reflow(info.callback.__doc__)
    for group in app.registered_groups:
        reflow_help(group.typer_instance)
