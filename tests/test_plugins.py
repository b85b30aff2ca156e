"""Plugins: entry-point discovery, listing with the source package, clashes, broken plugins, the public
API, and the example Shortcut-model plugin (tests/plugins/fewstep-shortcut) end to end."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fewstep import api
from fewstep import registry as reg_mod
from fewstep.cli import app
from fewstep.registry import REGISTRIES, RegistryError, objectives
from fewstep.testing import ObjectiveContract, tiny_objective

PLUGIN_DIR = Path(__file__).parent / "plugins" / "fewstep-shortcut"
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


class _Dist:
    """Stands in for the ``importlib.metadata.Distribution`` an installed entry point belongs to."""

    def __init__(self, name: str):
        self.name, self.version = name, "0.1.0"


@pytest.fixture
def entry_points(monkeypatch):
    """``add(group, name, value, dist)`` makes fewstep see an entry point as if package ``dist`` declared it."""
    extra: list[importlib.metadata.EntryPoint] = []
    real = reg_mod._entry_points
    monkeypatch.setattr(reg_mod, "_entry_points", lambda group: real(group) + [e for e in extra if e.group == group])

    def add(group: str, name: str, value: str, dist: str) -> None:
        extra.append(importlib.metadata.EntryPoint(name=name, value=value, group=group)._for(_Dist(dist)))
        for r in REGISTRIES.values():
            r.rescan()

    yield add
    extra.clear()
    for r in REGISTRIES.values():
        r.rescan()


@pytest.fixture
def shortcut_plugin(entry_points, monkeypatch):
    """The example plugin on sys.path and declared under ``fewstep.objectives`` as ``shortcut``."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    monkeypatch.delitem(sys.modules, "fewstep_shortcut", raising=False)
    entry_points("fewstep.objectives", "shortcut", "fewstep_shortcut:Shortcut", "fewstep-shortcut")


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(source)


# ---------------------------------------------------------------------------------------------------
# Discovery and listing
# ---------------------------------------------------------------------------------------------------
def test_plugin_is_discovered_lazily_listed_with_its_package_and_resolved(shortcut_plugin):
    assert "fewstep_shortcut" not in sys.modules          # declared, not imported before first use
    entry = objectives.entry("shortcut")
    assert entry.source == "fewstep-shortcut" and entry.obj.__module__ == "fewstep_shortcut"
    assert entry.summary.startswith("Shortcut model: flow matching at the finest step")
    listing = " ".join(cli("list", "objectives").output.split())
    assert "shortcut │ fewstep-shortcut │ Shortcut model" in listing and "fm │ fewstep │" in listing
    res = cli("train", "--objective", "shortcut", "--dry-run")
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output)
    assert cfg["objective"] == {"name": "shortcut", "levels": 7, "bootstrap_fraction": 0.25,
                                "teacher_beta": 0.999, "label_dropout": 0.1}
    assert cfg["backbone"]["gap_embedder"] is True and cfg["backbone"]["guidance_embedder"] is False


def test_registries_load_entry_points_once_on_first_use(monkeypatch):
    calls = []
    monkeypatch.setattr(reg_mod, "_entry_points", lambda group: calls.append(group) or [])
    r = reg_mod.Registry("widget", "fewstep", "fewstep.widgets")
    r.add("a", object())
    assert calls == []
    assert r.names() == ["a"] and "a" in r and r.names() == ["a"]
    assert calls == ["fewstep.widgets"]
    r.rescan()
    r.names()
    assert calls == ["fewstep.widgets"] * 2


@pytest.mark.usefixtures("shortcut_plugin")
class TestShortcutContract(ObjectiveContract):
    """The example plugin passes the contract suite, found through its entry point."""

    def make_objective(self):
        return tiny_objective("shortcut")


# ---------------------------------------------------------------------------------------------------
# Clashes and broken plugins
# ---------------------------------------------------------------------------------------------------
def test_name_clash_between_two_plugins_names_both_packages(shortcut_plugin, entry_points):
    entry_points("fewstep.objectives", "shortcut", "collections:OrderedDict", "other-shortcut")
    pattern = r"objective name 'shortcut' is registered twice: by 'fewstep-shortcut' .* and by 'other-shortcut'"
    for _ in range(2):                                     # every use fails until one is removed
        with pytest.raises(RegistryError, match=pattern):
            objectives.get("fm")
    res = cli("list")
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "objectives: objective name 'shortcut' is registered twice: by 'fewstep-shortcut'" in text
    assert "dit-xl" in text and "smoke" in text            # the other kinds are still listed
    res = cli("train", "--objective", "fm", "--dry-run")
    assert res.exit_code == 2 and "registered twice" in res.output


def test_plugin_clashing_with_a_builtin_names_fewstep(entry_points):
    entry_points("fewstep.backbones", "dit-s", "collections:OrderedDict", "evil-dit")
    with pytest.raises(RegistryError, match=r"'dit-s' is registered twice: by 'fewstep' .* and by 'evil-dit'"):
        reg_mod.backbones.names()


def test_broken_plugins_are_listed_unavailable_and_everything_else_works(entry_points, tmp_path, monkeypatch):
    write_module(tmp_path, "needs_libfoo", "raise ImportError('this plugin needs libfoo')\n")
    write_module(tmp_path, "fine_module", "x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry_points("fewstep.objectives", "foo", "needs_libfoo:Foo", "fewstep-foo")
    entry_points("fewstep.objectives", "typo", "fine_module:Missing", "fewstep-typo")
    res = cli("list", "objectives")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "foo │ unavailable │ ImportError: this plugin needs libfoo" in text and "'fewstep-foo'" in text
    assert "typo │ unavailable │ AttributeError" in text and "tvm │ fewstep" in text
    assert cli("train", "--objective", "fm", "--dry-run").exit_code == 0
    res = cli("train", "--objective", "foo", "--dry-run")
    assert res.exit_code == 2
    assert "objective 'foo' is unavailable: its plugin failed to load: ImportError: this plugin needs libfoo" in res.output


def test_plugin_that_also_uses_the_decorator_is_not_a_clash(entry_points, tmp_path, monkeypatch):
    write_module(tmp_path, "selfreg_plugin", (
        "from dataclasses import dataclass\n"
        "from fewstep.api import objectives\n"
        "from fewstep.objectives.fm import FlowMatching, FlowMatchingConfig\n"
        "@dataclass(kw_only=True)\n"
        "class SelfRegConfig(FlowMatchingConfig):\n"
        "    name: str = 'selfreg'\n"
        "@objectives.register('selfreg', summary='registers itself too')\n"
        "class SelfReg(FlowMatching):\n"
        "    Config = SelfRegConfig\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    entry_points("fewstep.objectives", "selfreg", "selfreg_plugin:SelfReg", "fewstep-selfreg")
    entry = objectives.entry("selfreg")
    assert entry.source == "fewstep-selfreg" and entry.summary == "registers itself too"


# ---------------------------------------------------------------------------------------------------
# The public API
# ---------------------------------------------------------------------------------------------------
def test_api_exports_and_time_convention():
    assert all(hasattr(api, name) for name in api.__all__)
    assert api.Objective is __import__("fewstep.contracts").contracts.Objective and api.objectives is objectives
    x, eps = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    xt = api.interpolate(x, eps, t)
    assert torch.equal(xt[0], x[0]) and torch.equal(xt[2], eps[2])
    h = 1e-6   # v = dx_t/dt
    fd = (api.interpolate(x, eps, t + h) - api.interpolate(x, eps, t - h)) / (2 * h)
    assert torch.allclose(fd, api.velocity(x, eps), atol=1e-8)
    assert (api.NOISE_TIME, api.DATA_TIME) == (1.0, 0.0)


def test_example_plugin_imports_only_the_public_api():
    tree = ast.parse((PLUGIN_DIR / "fewstep_shortcut.py").read_text())
    imported = {node.module if isinstance(node, ast.ImportFrom) else alias.name
                for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    fewstep_imports = {m for m in imported if m and m.startswith("fewstep")}
    assert fewstep_imports == {"fewstep"}                  # `from fewstep import api`
    assert 'shortcut = "fewstep_shortcut:Shortcut"' in (PLUGIN_DIR / "pyproject.toml").read_text()


# ---------------------------------------------------------------------------------------------------
# The example objective's math: a point mass, where the exact average velocity is known
# ---------------------------------------------------------------------------------------------------
class PointMassVelocity(nn.Module):
    """u(x_t, t, s) = c·(x_t − μ)/t: for c = 1 the exact average velocity over any jump t → s when all
    data sit at μ (x_t moves on the straight line from ε to μ)."""

    def __init__(self, mu: torch.Tensor, c: float = 1.0):
        super().__init__()
        self.mu, self.c = mu, c
        self.in_channels, self.input_size, self.num_classes = mu.shape[0], mu.shape[1], 0
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, s=None, y=None, **cond):
        assert s is not None and bool((s < t).all()) and bool((s >= 0).all())
        return self.c * (x - self.mu) / t[:, None, None, None] + 0 * self.unused


@pytest.fixture
def Shortcut(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    import fewstep_shortcut

    return fewstep_shortcut.Shortcut


def test_shortcut_loss_is_zero_for_the_exact_flow_and_scales_quadratically(Shortcut):
    mu = torch.randn(2, 4, 4, dtype=torch.float64)
    x = mu.expand(16, 2, 4, 4).clone()

    def loss(c: float, fraction: float, teacher_c: float | None = None):
        obj = Shortcut(PointMassVelocity(mu, c), Shortcut.Config(bootstrap_fraction=fraction), num_classes=0)
        if teacher_c is not None:
            obj.teacher.c = teacher_c
        return obj(x, None, torch.Generator().manual_seed(0)).per_sample

    assert loss(1.0, 0.5).abs().max() < 1e-12             # FM and self-consistency targets are both exact
    ratio = loss(1.2, 0.0) / loss(1.1, 0.0)               # FM only: (c − 1)²·‖ε − μ‖²/D (float32 loss)
    assert torch.allclose(ratio, torch.full_like(ratio, 4.0), rtol=1e-5)
    boot = loss(1.0, 1.0, teacher_c=0.5)    # targets come from the teacher: (1/4)(1 + (t − d/4)/(t − d/2)) ≤ 5/8 of ε − μ
    assert (boot > 1e-3).all() and loss(1.0, 0.0, teacher_c=0.5).abs().max() < 1e-12


def test_shortcut_sampler_lands_on_the_point_mass(Shortcut):
    mu = torch.randn(1, 2, 2)
    obj = Shortcut(PointMassVelocity(mu), Shortcut.Config(), num_classes=0)
    for nfe in (1, 2, 4):
        images = api.sample(obj, list(range(5)), nfe).images
        assert torch.allclose(images, mu.expand_as(images), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# A real install: pip into a target directory, then `fewstep list` and `fewstep train` in a subprocess
# ---------------------------------------------------------------------------------------------------
def test_installed_plugin_trains_through_the_cli(tmp_path):
    source = shutil.copytree(PLUGIN_DIR, tmp_path / "src")    # build artefacts stay out of the repo
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--quiet", "--target", str(site), str(source)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    assert (site / "fewstep_shortcut-0.1.0.dist-info" / "entry_points.txt").is_file()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}

    def fewstep(*args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "fewstep.cli", *args], capture_output=True, text=True,
                             env=env, cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        return " ".join(res.stdout.split())

    assert "shortcut │ fewstep-shortcut │ Shortcut model" in fewstep("list", "objectives")
    out = fewstep("train", "--recipe", "toy2d", "--objective", "shortcut", "--kimg", "0.512", "--batch", "256",
                  "--out", "run", "--no-progress", "--set", "sample.num_images=64", "--set", "train.status_kimg=0.256")
    assert "done: 0.5 kimg, 2 steps, loss" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["sliced_wasserstein"]) == {"1", "4"}
    assert "5 images × [1 NFE (1 evaluations), 2 NFE (2 evaluations)]" in fewstep(
        "sample", "--run", "run", "--nfe", "1,2", "--seeds", "0-4", "--out", "grid.png")


def test_an_objective_entry_point_that_is_not_a_class_is_listed_as_unavailable(entry_points):
    entry_points("fewstep.objectives", "joined", "os.path:join", "bad-plugin")
    listed = " ".join(runner.invoke(app, ["list", "objectives"], env={"COLUMNS": "400"}).output.split())
    assert "joined │ unavailable" in listed and "is a function, not a class" in listed
    res = cli("train", "--objective", "joined", "--dry-run")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "objective 'joined' is unavailable" in " ".join(res.output.split())
