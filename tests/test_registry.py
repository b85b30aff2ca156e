"""Registry: registration, lookup errors with suggestions, duplicates and plugins."""
from __future__ import annotations

import importlib.metadata

import pytest

from fewstep import registry as reg_mod
from fewstep.registry import Registry, RegistryError


def make() -> Registry:
    return Registry("widget", "fewstep", "fewstep.test-widgets")


def test_register_get_and_list():
    r = make()

    @r.register("alpha", summary="first")
    class Alpha:
        """Alpha widget."""

    r.add("beta", lambda: 1)
    assert r.get("alpha") is Alpha
    assert r.names() == ["alpha", "beta"]
    assert [e.summary for e in r.entries()][0] == "first"
    assert "alpha" in r and "gamma" not in r


def test_unknown_name_suggests_closest():
    r = make()
    r.add("meanflow", object())
    with pytest.raises(RegistryError, match=r"unknown widget 'meanflw'; did you mean 'meanflow'"):
        r.get("meanflw")


def test_duplicate_names_are_errors_naming_both_sources():
    r = make()
    r.add("x", object(), source="pkg-a")
    with pytest.raises(RegistryError, match=r"registered twice: by 'pkg-a'.*and by 'pkg-b'"):
        r.add("x", object(), source="pkg-b")


class _FakeDist:
    name = "fewstep-plugin-demo"


def _ep(name: str, value: str) -> importlib.metadata.EntryPoint:
    ep = importlib.metadata.EntryPoint(name=name, value=value, group="fewstep.test-widgets")
    try:
        return ep._for(_FakeDist())  # type: ignore[attr-defined]
    except AttributeError:
        return ep


def test_entry_point_plugins_load_lazily_and_broken_ones_are_reported(monkeypatch):
    eps = [_ep("good", "collections:OrderedDict"), _ep("broken", "no_such_module_xyz:thing")]
    monkeypatch.setattr(reg_mod, "_entry_points", lambda group: eps)
    r = make()
    assert r.get("good").__name__ == "OrderedDict"
    assert "broken" in r.unavailable()
    assert "No module named 'no_such_module_xyz'" in r.unavailable()["broken"]
    with pytest.raises(RegistryError, match="unavailable: its plugin failed to load"):
        r.get("broken")


def test_plugin_clash_with_builtin_is_an_error(monkeypatch):
    monkeypatch.setattr(reg_mod, "_entry_points", lambda group: [_ep("fm", "collections:OrderedDict")])
    r = Registry("objective", "fewstep.objectives", "fewstep.objectives")
    r.add("fm", object())
    with pytest.raises(RegistryError, match="registered twice"):
        r.names()


def test_builtin_registries_are_populated():
    assert "fm" in reg_mod.objectives.names()
    assert "smoke" in reg_mod.recipes.names()
    assert "fashion-mnist" in reg_mod.datasets.names()
    assert {"dit-debug", "dit-s", "dit-b", "dit-l", "dit-xl"} <= set(reg_mod.backbones.names())
