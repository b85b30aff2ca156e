"""What a sweep is: :class:`SweepSpec` (shared settings) and its :class:`Member` runs, read from the CLI or
a TOML/JSON sweep file, and each member's full run config for one training seed.

Every member trains the recipe with the same backbone, data, seeds, budget and evaluation; only the
objective and the member's own overrides differ. Each (member, seed) pair is one run, a *unit*, in
``<sweep>/<member>/seed-<seed>/``. The budget is one of equal images (``kimg``), equal wall-clock
(``minutes``) or equal training FLOPs (``tflop``: each member stops at its own image count,
``tflop``·10¹² / its FLOPs per image). The resolved spec is saved as ``sweep.json`` in the sweep
directory; rerunning with another spec there is an error that names each difference (execution options
such as ``--parallel`` are not part of it), except the budget's value and the seeds.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewstep.config import ConfigError, RunConfig, coerce, require
from fewstep.files import write_json

SPEC_FILE = "sweep.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
POINTS_METRIC = "sliced-wasserstein"


class SweepError(ValueError):
    """A sweep spec that is malformed, inconsistent, or differs from the one saved in the sweep directory."""


@dataclass(kw_only=True)
class Member:
    """One run of a sweep.

    Attributes:
        objective: registered objective name (``fm``, ``tvm`` …).
        name: directory and row name (letters, digits, ``.``, ``_``, ``-``); default: the objective.
        overrides: ``section.field=value`` overrides applied after the sweep's shared ones.
        init_from: the name of an earlier member whose finished run (of the same training seed)
            initialises this one (``train.init_from``; e.g. ``dmf`` from ``fm``); it trains only after
            that member's unit finished.
    """

    objective: str
    name: str = ""
    overrides: tuple[str, ...] = ()
    init_from: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.objective
        if not NAME.fullmatch(self.name):
            raise SweepError(f"member name {self.name!r} must be letters, digits, '.', '_' or '-' "
                             "(it names a directory)")


@dataclass(kw_only=True)
class SweepSpec:
    """Settings shared by every member.

    Attributes:
        recipe: registered recipe (``fewstep list recipes``), called with each member's objective.
        members: the runs; names must be unique.
        kimg: equal images: training length per member in thousands of images.
        minutes: equal wall-clock: training budget per member (``train.max_minutes``, summed over resumes).
        tflop: equal compute: training FLOPs per member in units of 10¹² (model FLOPs from the objective's
            ``flops_per_sample`` and the backbone's ``forward_flops``); each member trains
            ``tflop·10¹² / flops per image`` images. At most one of ``kimg``, ``minutes``, ``tflop``;
            none: the recipe's length (equal images).
        eval_every_kimg: also evaluate every member's EMA weights every this many kimg during training (the
            same samples and metrics as the final evaluation): the learning curves.
        nfe: sampler jumps evaluated, one metric value (and grid block) each.
        metrics: feature extractors (``fewstep list extractors``) for Fréchet distances to the data,
            ``sliced-wasserstein`` for point data, or ``auto`` (``fmnist-classifier`` on Fashion-MNIST,
            ``inception`` on other images, ``sliced-wasserstein`` on points); resolved before saving. The
            first one ranks the table; images are sampled once for all of them.
        protocol: ``clean``, ``adm`` or ``edm2`` (:mod:`fewstep.metrics.protocols`): the samples' uint8
            conversion and the Inception resize.
        num: samples per NFE for the metric (seeds 0 … num − 1).
        seeds: training seeds (``train.seed``); every member trains once per seed.
        overrides: ``section.field=value`` overrides for every member.
        backbone, data, batch: as ``fewstep train --backbone/--data/--batch`` (``None``: the recipe's).
        ref: reference statistics (``.npz`` from ``fewstep fid-ref``) for a single image metric; default:
            computed once into the sweep directory from the training split.
        ref_num: dataset items used for computed reference statistics (``None``: the whole split).
        grid: images per NFE block in each member's sample grid (seeds 0 … grid − 1, first training seed).
    """

    recipe: str
    members: tuple[Member, ...]
    kimg: float | None = None
    minutes: float | None = None
    tflop: float | None = None
    eval_every_kimg: float | None = None
    nfe: tuple[int, ...] = (1, 2, 4)
    metrics: tuple[str, ...] = ("auto",)
    protocol: str = "clean"
    num: int = 10000
    seeds: tuple[int, ...] = (0,)
    overrides: tuple[str, ...] = ()
    backbone: str | None = None
    data: str | None = None
    batch: int | None = None
    ref: str | None = None
    ref_num: int | None = None
    grid: int = 64

    def __post_init__(self) -> None:
        from fewstep.metrics.protocols import PROTOCOLS

        names = [m.name for m in self.members]
        dupes = sorted({n for n in names if names.count(n) > 1})
        for i, m in enumerate(self.members):
            if m.init_from and m.init_from not in names[:i]:
                raise SweepError(f"member {m.name!r} initialises from {m.init_from!r}, which must be an earlier member "
                                 f"of the sweep (members: {', '.join(names)})")
        budgets = [k for k in BUDGET_KEYS if getattr(self, k) is not None]
        checks = [(bool(self.members), "a sweep needs at least one member"),
                  (not dupes, f"member names must be unique; {', '.join(dupes)} appear twice (give them names)"),
                  (self.nfe and all(n >= 1 for n in self.nfe), f"nfe must be ≥ 1 each, got {self.nfe}"),
                  (len(budgets) <= 1, f"a sweep compares at one budget; got {' and '.join('--' + b for b in budgets)}: "
                                      "give one of --kimg (equal images), --minutes (equal wall-clock) or --tflop "
                                      "(equal FLOPs)"),
                  (self.kimg is None or self.kimg > 0, f"kimg must be > 0, got {self.kimg}"),
                  (self.minutes is None or self.minutes > 0, f"minutes must be > 0, got {self.minutes}"),
                  (self.tflop is None or self.tflop > 0, f"tflop must be > 0, got {self.tflop}"),
                  (self.eval_every_kimg is None or self.eval_every_kimg > 0,
                   f"eval_every_kimg must be > 0, got {self.eval_every_kimg}"),
                  (bool(self.seeds) and len(set(self.seeds)) == len(self.seeds) and min(self.seeds) >= 0,
                   f"seeds must be distinct non-negative integers, got {list(self.seeds)}"),
                  (bool(self.metrics) and len(set(self.metrics)) == len(self.metrics),
                   f"metrics must be distinct names, got {list(self.metrics)}"),
                  (self.protocol in PROTOCOLS, f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"),
                  (self.ref is None or len(self.metrics) == 1,
                   "ref gives the statistics of one metric; with several metrics let the sweep compute them"),
                  (self.num >= 2, f"num must be ≥ 2 (a covariance needs two samples), got {self.num}"),
                  (self.grid >= 1, f"grid must be ≥ 1, got {self.grid}")]
        require(checks, error=SweepError)

    @property
    def metric(self) -> str:
        """The first metric: the one the table ranks by."""
        return self.metrics[0]

    def budget(self) -> tuple[str, float | None]:
        """(kind, value): ``kimg``, ``minutes`` or ``tflop``, or ``("kimg", None)`` for the recipe's length."""
        for key in BUDGET_KEYS:
            if getattr(self, key) is not None:
                return key, getattr(self, key)
        return "kimg", None

    def budget_text(self) -> str:
        """The budget in words, for reports: ``equal images: 150 kimg per member``."""
        kind, value = self.budget()
        if value is None:
            return "equal images: the recipe's length per member"
        return {"kimg": f"equal images: {value:g} kimg per member",
                "minutes": f"equal wall-clock: {value:g} training minutes per member",
                "tflop": f"equal compute: {value:g} TFLOP of training per member (each member stops at its own "
                         "image count)"}[kind]

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise SweepError(f"no member {name!r} in this sweep (members: {', '.join(m.name for m in self.members)})")


# Spec keys a rerun may change: the budget's value (members train on from their checkpoints and are
# evaluated again; the curves continue) and the seeds (new seeds train; dropped ones leave the report).
BUDGET_KEYS = ("kimg", "minutes", "tflop")
RERUN_KEYS = BUDGET_KEYS + ("seeds",)


def parse_objectives(text: str) -> tuple[Member, ...]:
    """``"fm,meanflow,tvm"`` → one member per objective, named after it; ``objective@member`` initialises
    that member from an earlier one's finished run (``"fm,dmf@fm"``: DMF converts the fm member)."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise SweepError(f"--objectives needs a comma list of objective names, got {text!r}")
    members = []
    for item in names:
        objective, _, source = item.partition("@")
        members.append(Member(objective=objective.strip(), init_from=source.strip()))
    return tuple(members)


def spec_to_dict(spec: SweepSpec) -> dict[str, Any]:
    """A JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def spec_from_dict(data: dict[str, Any], where: str = "sweep spec") -> SweepSpec:
    """Build a :class:`SweepSpec` from a dict (a sweep file or ``sweep.json``); unknown keys and values of
    the wrong type are errors naming the key. ``metric`` (one name or a comma list) and ``seed`` (one
    seed) are accepted for ``metrics`` and ``seeds``."""
    from fewstep.config import _unknown

    data = dict(data)
    if "metric" in data and "metrics" not in data:
        value = data.pop("metric")
        data["metrics"] = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if "seed" in data and "seeds" not in data:
        data["seeds"] = [data.pop("seed")]
    known = [f.name for f in dataclasses.fields(SweepSpec)]
    for key in data:
        if key not in known:
            raise SweepError(_unknown(key, known, where))
    if "recipe" not in data or "members" not in data:
        raise SweepError(f"{where} needs 'recipe' and 'members'")
    members = []
    for i, m in enumerate(data.pop("members")):
        if isinstance(m, str):
            m = {"objective": m}
        if not isinstance(m, dict) or "objective" not in m:
            raise SweepError(f"{where}: member {i} must be an objective name or a table with 'objective'")
        for key in m:
            if key not in ("objective", "name", "overrides", "init_from"):
                raise SweepError(_unknown(key, ["objective", "name", "overrides", "init_from"], f"{where} member {i}"))
        members.append(Member(objective=str(m["objective"]), name=str(m.get("name", "")),
                              overrides=_strings(m.get("overrides", ()), f"{where} member {i} overrides"),
                              init_from=str(m.get("init_from", ""))))
    typed = {}
    annotations = typing.get_type_hints(SweepSpec)
    for key, value in data.items():
        if key == "overrides":
            typed[key] = _strings(value, f"{where} overrides")
        else:
            try:
                typed[key] = coerce(value, annotations[key], key)
            except ConfigError as exc:
                raise SweepError(f"{where}: {exc}") from exc
    return SweepSpec(members=tuple(members), **typed)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise SweepError(f"{where} must be a list of 'section.field=value' strings, got {value!r}")
    return tuple(value)


def load_sweep_file(path: str | os.PathLike) -> dict[str, Any]:
    """The dict in a ``.toml`` or ``.json`` sweep file (checked by :func:`spec_from_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sweep file {path}")
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    if path.suffix != ".toml":
        raise SweepError(f"sweep file {path} must end in .toml or .json")
    try:
        import tomllib
    except ModuleNotFoundError:   # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as exc:
            raise SweepError("TOML sweep files need Python ≥ 3.11 or the tomli package; use JSON") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"{path}: {exc}") from exc


def spec_from_options(file: str | os.PathLike | None, objectives: str | None, sets: list[str],
                      **options: Any) -> SweepSpec:
    """The spec of ``fewstep sweep``: the sweep file's settings (if any), then the command-line ``options``
    that are not ``None`` (they win), members from ``objectives`` when given, ``sets`` appended to the
    shared overrides."""
    data = load_sweep_file(file) if file is not None else {}
    data.update({k: v for k, v in options.items() if v is not None})
    if objectives is not None:
        data["members"] = [dataclasses.asdict(m) for m in parse_objectives(objectives)]
    if sets:
        data["overrides"] = list(data.get("overrides", [])) + list(sets)
    if "members" not in data:
        raise SweepError("name the members with --objectives fm,tvm,… or a sweep file (--file)")
    if "recipe" not in data:
        raise SweepError("name the recipe with --recipe (e.g. fashion-mnist-sweep) or in the sweep file")
    return spec_from_dict(data, str(file) if file is not None else "sweep options")


def member_config(spec: SweepSpec, member: Member, seed: int | None = None,
                  sweep_dir: str | os.PathLike | None = None) -> RunConfig:
    """The resolved run config of one member and training seed (default: the first): the recipe for its
    objective, the sweep's backbone, data, batch, budget and seed, then the shared and the member's
    overrides (in that order). An equal-FLOP budget becomes the member's own ``train.total_kimg``.
    A member with ``init_from`` gets ``train.init_from`` = that member's run directory of the same seed in
    ``sweep_dir`` (its bare name when ``sweep_dir`` is not given: enough for checks, not for training)."""
    from fewstep.build import resolve
    from fewstep.build import build_config
    from fewstep.train import check_config

    seed = spec.seeds[0] if seed is None else seed
    base = [f"train.seed={seed}"] + ([f"train.max_minutes={spec.minutes}"] if spec.minutes else [])
    try:
        cfg = build_config(spec.recipe, member.objective, spec.backbone, spec.data, spec.kimg, spec.batch,
                           base + list(spec.overrides) + list(member.overrides))
        if member.init_from:   # <sweep>/<source>/seed-<seed> (worker.unit_dir)
            source = (Path(sweep_dir).resolve() / member.init_from / f"seed-{seed}" if sweep_dir is not None
                      else Path(member.init_from))
            cfg.train.init_from = str(source)
        cfg = resolve(cfg)
        if spec.tflop is not None:
            per_image = flops_per_image(cfg)
            if per_image is None:
                raise ConfigError(f"--tflop needs the training FLOPs per image, but backbone {cfg.backbone.name!r} "
                                  "has no forward_flops(); use --kimg or --minutes")
            cfg.train.total_kimg = spec.tflop * 1e12 / per_image / 1000
        check_config(cfg)
    except (ConfigError, ValueError) as exc:
        raise SweepError(f"member {member.name!r}: {exc}") from exc
    return cfg


_SPECS: dict[tuple, Any] = {}


def data_spec(cfg: RunConfig) -> Any:
    """The :class:`~fewstep.contracts.DataSpec` of a config's data (the dataset is loaded once per process)."""
    from fewstep.data import load_dataset

    key = (cfg.data.name, cfg.data.root, cfg.data.split, cfg.data.resolution)
    if key not in _SPECS:
        _SPECS[key] = load_dataset(cfg.data).spec
    return _SPECS[key]


def flops_per_image(cfg: RunConfig) -> float | None:
    """Training FLOPs per image of a config (:func:`fewstep.build.training_flops_per_image` of the objective
    built on the ``meta`` device: no memory, no compute)."""
    import torch

    from fewstep.build import build_objective, training_flops_per_image

    spec = data_spec(cfg)
    with torch.device("meta"):
        objective = build_objective(cfg, spec)
    return training_flops_per_image(objective)


def resolve_metric(spec: SweepSpec, cfg: RunConfig, data_kind: str) -> tuple[str, ...]:
    """The metrics with ``auto`` resolved, given a member's config and its data kind (``pixels``/``points``)."""
    from fewstep.registry import extractors

    out = []
    for metric in spec.metrics:
        if metric == "auto":
            metric = (POINTS_METRIC if data_kind == "points" else
                      "fmnist-classifier" if cfg.data.name == "fashion-mnist" else "inception")
        if data_kind == "points" and metric != POINTS_METRIC:
            raise SweepError(f"metric {metric!r} needs images, but {cfg.data.name!r} holds points; use {POINTS_METRIC}")
        if data_kind != "points":
            if metric == POINTS_METRIC:
                raise SweepError(f"{POINTS_METRIC} scores point data; {cfg.data.name!r} holds images (use an extractor)")
            import fewstep.metrics.classifier  # noqa: F401  (registers fmnist-classifier)

            extractors.get(metric)   # unknown names fail here, with suggestions
        out.append(metric)
    if len(set(out)) != len(out):
        raise SweepError(f"metrics {list(spec.metrics)} name the same metric twice once 'auto' is resolved")
    return tuple(out)


def check_saved(sweep_dir: Path, spec: SweepSpec) -> list[str]:
    """Write ``sweep.json``, or refuse when the one already there differs in anything but the budget's
    value and the seeds (naming every difference). Returns the allowed changes (``key: old → new``),
    already saved."""
    path = sweep_dir / SPEC_FILE
    new = spec_to_dict(spec)
    changes: list[str] = []
    if path.exists():
        old = json.loads(path.read_text())
        keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
        changes = [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys]
        fixed = [c for k, c in zip(keys, changes)
                 if k not in RERUN_KEYS or (k in BUDGET_KEYS and (old.get(k) is None) != (new.get(k) is None))]
        if fixed:
            raise SweepError(f"{sweep_dir} holds a sweep with another spec ({'; '.join(fixed)}); use another "
                             f"--out directory, or the same settings to resume it (only the budget's value "
                             f"(kimg, minutes or tflop, not which one) and the seeds may change)")
        if not changes:
            return []
    write_json(path, new)
    return changes


__all__ = ["BUDGET_KEYS", "Member", "SweepError", "SweepSpec", "check_saved", "data_spec", "flops_per_image",
           "load_sweep_file", "member_config", "parse_objectives", "resolve_metric", "spec_from_dict",
           "spec_from_options", "spec_to_dict"]
