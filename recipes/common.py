"""Helpers shared by recipes."""
from __future__ import annotations

import dataclasses
from typing import Any

from fewstep.config import ObjectiveConfig, default_objective_config, replace_fields


def objective_config(name: str, **fields: Any) -> ObjectiveConfig:
    """The default config of objective ``name`` with ``fields`` replaced (type-checked)."""
    cfg = default_objective_config(name)
    return replace_fields(cfg, fields, "objective") if fields else cfg


def only_known(cfg: ObjectiveConfig, **fields: Any) -> ObjectiveConfig:
    """Replace the given fields that ``cfg`` has (recipes shared by several objectives)."""
    names = {f.name for f in dataclasses.fields(cfg)}
    known = {k: v for k, v in fields.items() if k in names}
    return replace_fields(cfg, known, "objective") if known else cfg
