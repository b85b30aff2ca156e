"""Explicit, listable registries for objectives, backbones, datasets, recipes, metrics and extractors.

In-tree components register with a decorator when their package is imported::

    from fewstep.registry import objectives

    @objectives.register("fm", summary="flow matching")
    class FlowMatching(Objective): ...

Third-party packages register through entry points in the groups ``fewstep.objectives``,
``fewstep.backbones``, ``fewstep.datasets``, ``fewstep.recipes``, ``fewstep.metrics`` and
``fewstep.extractors``; each entry point names the object to register
(``mymethod = "my_pkg.module:MyObjective"``). Entry points are loaded lazily, on the first lookup or
listing. A duplicate name is an error naming both sources, raised on every use of that registry until
one of the two is removed; a plugin that fails to load is recorded as unavailable with its error and
everything else keeps working. See ``docs/plugins.md``.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Any, Callable, Iterator


class RegistryError(LookupError):
    """An unknown, unavailable or duplicate component name."""


@dataclass(frozen=True)
class Entry:
    """One registered component.

    Attributes:
        kind: registry kind, e.g. ``"objective"``.
        name: the name users type, e.g. ``"tvm"``.
        obj: the registered class or function.
        source: the distribution it came from (``"fewstep"`` for in-tree components).
        summary: one line for ``fewstep list``.
    """

    kind: str
    name: str
    obj: Any
    source: str
    summary: str


def closest(name: str, choices: list[str], n: int = 3) -> list[str]:
    """Up to ``n`` names from ``choices`` that look like ``name`` (for "did you mean" messages)."""
    return difflib.get_close_matches(name, choices, n=n, cutoff=0.5)


def _entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    """Installed entry points of one group (patched in tests to inject fake plugins)."""
    return list(importlib.metadata.entry_points(group=group))


class Registry:
    """Name → component map of one kind.

    Args:
        kind: singular noun used in messages (``"objective"``).
        builtin_module: module whose import registers the in-tree components (imported lazily).
        group: entry-point group for third-party components.
        check: what is wrong with a loaded plugin object (``None`` if nothing): an entry point that names
            a function where a class is needed is listed as unavailable with that reason, instead of
            failing later with a traceback.
    """

    def __init__(self, kind: str, builtin_module: str, group: str,
                 check: Callable[[Any], str | None] = lambda obj: None if callable(obj) else "is not callable"):
        self.kind, self.builtin_module, self.group, self.check = kind, builtin_module, group, check
        self._entries: dict[str, Entry] = {}
        self._unavailable: dict[str, str] = {}   # name -> error message of a broken plugin
        self._plugins: set[str] = set()          # names that came from entry points
        self._error: str | None = None           # name clashes among plugins (raised on every use)
        self._loaded = False

    # -- registration ---------------------------------------------------------------------------
    def register(self, name: str, *, summary: str = "", source: str | None = None) -> Callable[[Any], Any]:
        """Decorator registering a class or function under ``name``; returns the object unchanged."""

        def decorator(obj: Any) -> Any:
            self.add(name, obj, summary=summary, source=source)
            return obj

        return decorator

    def add(self, name: str, obj: Any, *, summary: str = "", source: str | None = None) -> None:
        """Register ``obj`` under ``name``; a name already taken is a :class:`RegistryError`.

        ``source`` defaults to ``"fewstep"`` for in-tree objects and to the top-level package of
        ``obj``'s module otherwise (entry-point plugins get their distribution's name).
        """
        source = source or _source_of(obj)
        if name in self._entries:
            old = self._entries[name]
            raise RegistryError(
                f"{self.kind} name {name!r} is registered twice: by {old.source!r} ({_qualname(old.obj)}) "
                f"and by {source!r} ({_qualname(obj)}); rename one of them")
        if not summary:
            summary = ((getattr(obj, "__doc__", None) or "").strip().splitlines() or [""])[0]
        self._entries[name] = Entry(self.kind, name, obj, source, summary)

    def remove(self, name: str) -> None:
        """Unregister ``name`` (``fewstep.testing`` uses it to register a class under test for a while)."""
        self._entries.pop(name, None)
        self._plugins.discard(name)

    def rescan(self) -> None:
        """Forget the entry-point plugins and discover them again on next use (a plugin installed into
        a running process; tests that patch the entry-point lookup)."""
        for name in self._plugins:
            self._entries.pop(name, None)
        self._plugins.clear()
        self._unavailable.clear()
        self._error = None
        self._loaded = False

    # -- lookup ---------------------------------------------------------------------------------
    def get(self, name: str) -> Any:
        """The object registered under ``name``; unknown names fail with the closest valid ones."""
        return self.entry(name).obj

    def entry(self, name: str) -> Entry:
        self._load()
        if name in self._entries:
            return self._entries[name]
        if name in self._unavailable:
            raise RegistryError(f"{self.kind} {name!r} is unavailable: its plugin failed to load: "
                                f"{self._unavailable[name]}")
        hint = closest(name, self.names())
        msg = f"unknown {self.kind} {name!r}"
        if hint:
            msg += f"; did you mean {' or '.join(repr(h) for h in hint)}?"
        raise RegistryError(f"{msg} (available: {', '.join(self.names()) or 'none'})")

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def entries(self) -> Iterator[Entry]:
        self._load()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def unavailable(self) -> dict[str, str]:
        """Broken plugins: name → error message."""
        self._load()
        return dict(self._unavailable)

    # -- loading --------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._error is not None:
            raise RegistryError(self._error)
        if self._loaded:
            return
        self._loaded = True
        importlib.import_module(self.builtin_module)
        clashes = []
        for ep in _entry_points(self.group):
            source = ep.dist.name if getattr(ep, "dist", None) is not None else ep.value.split(":")[0]
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin is reported, never fatal
                self._unavailable[ep.name] = f"{type(exc).__name__}: {exc} (from {source!r}, {ep.value})"
                continue
            problem = self.check(obj)
            if problem and ep.name not in self._entries:   # a clash is reported as one, whatever the object
                self._unavailable[ep.name] = (f"entry point {ep.value} (from {source!r}) {problem}; "
                                              f"fix the entry point in that package's metadata")
                continue
            old = self._entries.get(ep.name)
            if old is not None and old.obj is obj:   # the plugin module also used the decorator
                self._entries[ep.name] = dataclasses.replace(old, source=source)
            else:
                try:
                    self.add(ep.name, obj, source=source)
                except RegistryError as exc:
                    clashes.append(str(exc))
                    continue
            self._plugins.add(ep.name)
        if clashes:
            self._error = "; ".join(clashes)
            raise RegistryError(self._error)


def _source_of(obj: Any) -> str:
    """``"fewstep"`` for in-tree objects, else the top-level package of the object's module."""
    return (getattr(obj, "__module__", None) or "fewstep").split(".")[0]


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _objective_problem(obj: Any) -> str | None:
    """An objective plugin must be a class with a ``Config`` and ``needs`` (``fewstep.api.Objective``)."""
    if not isinstance(obj, type):
        return f"is a {type(obj).__name__}, not a class; an objective is a class deriving fewstep.api.Objective"
    missing = [a for a in ("Config", "needs", "forward", "step") if not hasattr(obj, a)]
    return f"is a class without {', '.join(missing)}; derive it from fewstep.api.Objective" if missing else None


objectives = Registry("objective", "fewstep.objectives", "fewstep.objectives", check=_objective_problem)
backbones = Registry("backbone", "fewstep.backbones", "fewstep.backbones")
datasets = Registry("dataset", "fewstep.data", "fewstep.datasets")
recipes = Registry("recipe", "fewstep.recipes", "fewstep.recipes")
metrics = Registry("metric", "fewstep.metrics", "fewstep.metrics")
extractors = Registry("extractor", "fewstep.metrics", "fewstep.extractors")

REGISTRIES: dict[str, Registry] = {
    "objectives": objectives, "backbones": backbones, "datasets": datasets, "recipes": recipes,
    "metrics": metrics, "extractors": extractors}
