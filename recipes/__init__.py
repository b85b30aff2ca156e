"""Recipes: functions returning a complete :class:`fewstep.config.RunConfig`.

A recipe takes the objective name (``fewstep train --objective``) so it can choose settings that suit it;
everything else is overridden from the CLI with ``--set section.field=value``. Derive a new recipe by
calling an existing one and changing a few fields.
"""
from fewstep.recipes import default, fashion_mnist, frontier, imagenet, toy2d  # noqa: F401  (registration)
from fewstep.recipes.common import objective_config

__all__ = ["objective_config"]
