"""Plugins: entry-point discovery, listing with the source package, clashes, broken plugins, the public
API, and the example x-prediction plugin (tests/plugins/fewstep-xpred) end to end."""
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
from typer.testing import CliRunner

from fewstep import api
from fewstep import registry as reg_mod
from fewstep.cli import app
from fewstep.registry import REGISTRIES, RegistryError, objectives
from fewstep.objectives.common import per_sample
from fewstep.testing import ObjectiveContract, tiny_objective

from oracle import VelocityOracle, fm_floor

PLUGIN_DIR = Path(__file__).parent / "plugins" / "fewstep-xpred"
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
def xpred_plugin(entry_points, monkeypatch):
    """The example plugin on sys.path and declared under ``fewstep.objectives`` as ``xpred``."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    monkeypatch.delitem(sys.modules, "fewstep_xpred", raising=False)
    entry_points("fewstep.objectives", "xpred", "fewstep_xpred:XPrediction", "fewstep-xpred")


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(source)


# ---------------------------------------------------------------------------------------------------
# Discovery and listing
# ---------------------------------------------------------------------------------------------------
def test_plugin_is_discovered_lazily_listed_with_its_package_and_resolved(xpred_plugin):
    assert "fewstep_xpred" not in sys.modules             # declared, not imported before first use
    entry = objectives.entry("xpred")
    assert entry.source == "fewstep-xpred" and entry.obj.__module__ == "fewstep_xpred"
    assert entry.summary.startswith("x-prediction flow matching: the network denoises")
    listing = " ".join(cli("list", "objectives").output.split())
    assert "xpred │ fewstep-xpred │ x-prediction flow matching" in listing and "fm │ fewstep │" in listing
    res = cli("train", "--objective", "xpred", "--dry-run")
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output)
    assert cfg["objective"] == {"name": "xpred", "t_mean": -0.4, "t_std": 1.0, "t_eps": 0.05,
                                "label_dropout": 0.1, "guidance": 1.0}
    assert cfg["backbone"]["gap_embedder"] is False and cfg["backbone"]["guidance_embedder"] is False


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


@pytest.mark.usefixtures("xpred_plugin")
class TestXPredictionContract(ObjectiveContract):
    """The example plugin passes the contract suite, found through its entry point."""

    def make_objective(self):
        return tiny_objective("xpred", guidance=1.5)   # CFG at sampling: 2 evaluations per step


# ---------------------------------------------------------------------------------------------------
# Clashes and broken plugins
# ---------------------------------------------------------------------------------------------------
def test_name_clash_between_two_plugins_names_both_packages(xpred_plugin, entry_points):
    entry_points("fewstep.objectives", "xpred", "collections:OrderedDict", "other-xpred")
    pattern = r"objective name 'xpred' is registered twice: by 'fewstep-xpred' .* and by 'other-xpred'"
    for _ in range(2):                                     # every use fails until one is removed
        with pytest.raises(RegistryError, match=pattern):
            objectives.get("fm")
    res = cli("list")
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "objectives: objective name 'xpred' is registered twice: by 'fewstep-xpred'" in text
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
    tree = ast.parse((PLUGIN_DIR / "fewstep_xpred.py").read_text())
    imported = {node.module if isinstance(node, ast.ImportFrom) else alias.name
                for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    fewstep_imports = {m for m in imported if m and m.startswith("fewstep")}
    assert fewstep_imports == {"fewstep"}                  # `from fewstep import api`
    assert 'xpred = "fewstep_xpred:XPrediction"' in (PLUGIN_DIR / "pyproject.toml").read_text()


# ---------------------------------------------------------------------------------------------------
# The example objective's math, on the shared Gaussian oracle (tests/oracle.py)
# ---------------------------------------------------------------------------------------------------
class DenoiserOracle(VelocityOracle):
    """x̂*(x_t, t | y) = x_t − t·v*(x_t, t | y) = E[x | x_t, y] (+ error): the exact denoiser."""

    def forward(self, x, t, s=None, y=None, **cond):
        return x - per_sample(t, x) * (super().forward(x, t, s, y, **cond) - self.bias) + self.bias


@pytest.fixture
def XPrediction(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    import fewstep_xpred

    return fewstep_xpred.XPrediction


def test_xpred_exact_denoiser_reaches_the_flow_matching_floor_and_a_perturbed_one_does_not(XPrediction, gaussian):
    x, y = gaussian.batch(8192)
    config = XPrediction.Config(label_dropout=0.0, t_eps=1e-9)
    run = lambda error: XPrediction(DenoiserOracle(gaussian.means, gaussian.sigma, error), config,   # noqa: E731
                                    num_classes=gaussian.num_classes).double()(x, y, torch.Generator().manual_seed(0))
    exact, worse = run(0.0), run(0.01)
    gen = torch.Generator().manual_seed(0)       # the same draws: the times come first
    t = api.logit_normal(8192, -0.4, 1.0, gen, torch.device("cpu")).double()
    floor = fm_floor(t, gaussian.sigma)          # the velocity residual is v* − (ε − x): Var = σ²/S_t²
    assert abs(float(exact.per_sample.mean() - floor.mean())) < 6 * float(floor.mean()) * (2 / 16 / 8192) ** 0.5
    assert float(worse.loss) > float(exact.loss)   # x̂ off by t·δ: a velocity error δ


def test_xpred_sampler_jumps_to_the_class_mean_and_follows_the_exact_flow(XPrediction, gaussian):
    obj = XPrediction(DenoiserOracle(gaussian.means, gaussian.sigma), XPrediction.Config(t_eps=1e-6),
                      num_classes=gaussian.num_classes).double()
    one = api.sample(obj, list(range(64)), 1)
    assert torch.allclose(one.images.double(), gaussian.means[one.labels], atol=1e-5)   # x̂(ε, 1) = μ_y
    many = api.sample(obj, list(range(2000)), 64)                    # Euler on the exact velocity
    res = (many.images.double() - gaussian.means[many.labels]).flatten()
    assert abs(float(res.std()) - gaussian.sigma) < 0.02 and abs(float(res.mean())) < 0.01
    assert one.evaluations == 1 and api.sample(obj, [0], 2, guidance=2.0).evaluations == 4


# ---------------------------------------------------------------------------------------------------
# A real install: pip into a target directory, then `fewstep list` and `fewstep train` in a subprocess
# ---------------------------------------------------------------------------------------------------
def test_installed_plugin_trains_through_the_cli(tmp_path):
    source = shutil.copytree(PLUGIN_DIR, tmp_path / "src")    # build artefacts stay out of the repo
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--quiet", "--target", str(site), str(source)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    assert (site / "fewstep_xpred-0.1.0.dist-info" / "entry_points.txt").is_file()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}

    def fewstep(*args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "fewstep.cli", *args], capture_output=True, text=True,
                             env=env, cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        return " ".join(res.stdout.split())

    assert "xpred │ fewstep-xpred │ x-prediction flow matching" in fewstep("list", "objectives")
    out = fewstep("train", "--recipe", "toy2d", "--objective", "xpred", "--kimg", "0.512", "--batch", "256",
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
