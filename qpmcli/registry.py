"""Plugin discovery: the pluggy manager, loaded from the ``qpm`` entry-point group, name lookup, and the options a
plugin declares (``declared_options``; the CLI parses ``KEY=VALUE`` pairs with them in ``qpmcli.options``).

Built-in plugins (``qpm_plugins.*``) are registered through the very same entry points as third-party packages.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pluggy

from qpmcli import hookspecs
from qpmcli.errors import PluginError

KINDS = ("backbone", "dataset", "selector")
_HOOKS = {"backbone": "qpm_backbones", "dataset": "qpm_datasets", "selector": "qpm_selectors"}


@dataclass(frozen=True)
class Entry:
    """One registered plugin object: its kind, spec, and the distribution (package) that provides it."""

    kind: str
    name: str
    spec: Any
    package: str
    plugin: str  # entry-point name / module


class Registry:
    """All backbones, datasets and selectors of the installed plugins, by name."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        owners = _plugin_owners(pm)
        for kind in KINDS:
            hook = getattr(pm.hook, _HOOKS[kind])
            for impl in hook.get_hookimpls():
                package, plugin_name = owners.get(id(impl.plugin), ("<unknown>", pm.get_name(impl.plugin) or "?"))
                where = f"plugin {plugin_name!r} from package {package!r}"
                try:
                    with _plugin_output_to_stderr():
                        specs = impl.function()
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # a broken third-party plugin must name itself (sys.exit included)
                    raise PluginError(f"{where} failed in {_HOOKS[kind]}(): {_describe(exc)}") from exc
                specs = [] if specs is None else specs
                if not isinstance(specs, list | tuple):
                    raise PluginError(f"{where}: {_HOOKS[kind]}() must return a list of {kind} specs, not a "
                                      f"{type(specs).__name__}")
                for spec in specs:
                    if not isinstance(getattr(spec, "name", None), str) or not spec.name:
                        raise PluginError(f"{where}: {_HOOKS[kind]}() returned {type(spec).__name__!s} without a "
                                          f"name; each entry must be a {kind} spec (see qpmcli.contracts)")
                    existing = self._entries[kind].get(spec.name)
                    if existing is not None:
                        raise PluginError(
                            f"two plugins claim the {kind} name {spec.name!r}: package {existing.package!r} "
                            f"(plugin {existing.plugin!r}) and package {package!r} (plugin {plugin_name!r}); "
                            f"uninstall one of them")
                    self._entries[kind][spec.name] = Entry(kind, spec.name, spec, package, plugin_name)

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def entries(self, kind: str) -> list[Entry]:
        return [self._entries[kind][n] for n in self.names(kind)]

    def get(self, kind: str, name: str) -> Any:
        """The spec registered under ``name``, else the spec whose name is a prefix of ``name`` and that declares
        ``prefix=True`` (the longest such prefix); an unknown name lists the available ones."""
        entry = self._entries[kind].get(name)
        if entry is None:
            prefixes = [e for e in self._entries[kind].values()
                        if getattr(e.spec, "prefix", False) and name.startswith(e.name) and len(name) > len(e.name)]
            if prefixes:
                return max(prefixes, key=lambda e: len(e.name)).spec
            available = ", ".join(self.names(kind)) or "none installed"
            raise PluginError(f"unknown {kind} {name!r}; available: {available}")
        return entry.spec


def _plugin_owners(pm: pluggy.PluginManager) -> dict[int, tuple[str, str]]:
    owners: dict[int, tuple[str, str]] = {}
    for plugin, dist in pm.list_plugin_distinfo():
        owners[id(plugin)] = (dist.project_name, pm.get_name(plugin) or "?")
    for name, plugin in pm.list_name_plugin():
        owners.setdefault(id(plugin), ("<registered in code>", name))
    return owners


def make_plugin_manager(load_entrypoints: bool = True) -> pluggy.PluginManager:
    """The plugin manager with every ``qpm`` entry point loaded. A plugin that fails to import (or calls
    ``sys.exit``) is a :class:`PluginError` naming its entry point and package; what plugins print while loading
    goes to stderr, so ``--json`` output stays parseable."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    if load_entrypoints:
        try:
            with _plugin_output_to_stderr():
                pm.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            raise _load_failure(pm, exc) from exc
    return pm


def _load_failure(pm: pluggy.PluginManager, exc: BaseException) -> PluginError:
    """Which entry point failed: the first one of the group that is not registered and does not load on its own."""
    import importlib.metadata as md

    for dist in md.distributions():
        for ep in dist.entry_points:
            if ep.group != hookspecs.PROJECT_NAME or pm.has_plugin(ep.name) or pm.is_blocked(ep.name):
                continue
            try:
                with _plugin_output_to_stderr():
                    ep.load()
            except KeyboardInterrupt:
                raise
            except BaseException as again:
                package = dist.metadata["Name"] or "?"
                return PluginError(f"the qpm plugin {ep.name!r} ({ep.value}) of package {package!r} failed to load: "
                                   f"{_describe(again)}; fix or uninstall it (pip uninstall {package})")
    return PluginError(f"a qpm plugin failed to load: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _plugin_output_to_stderr():
    """Plugin code runs with ``sys.stdout`` pointing at stderr: a print in a plugin never mixes into our output."""
    import contextlib
    import sys

    return contextlib.redirect_stdout(sys.stderr)


@functools.cache
def get_registry() -> Registry:
    """The process-wide registry of installed plugins (built once, on first use)."""
    return Registry(make_plugin_manager())


# ------------------------------------------------------------------------------------------- declared options
_RESERVED = {"backbone": {"name", "weights", "preprocess", "settings", "dataset", "amp"},
             "dataset": {"root", "split"}, "selector": set()}


def declared_options(kind: str, spec: Any) -> dict[str, Any] | None:
    """``{name: PluginOption}`` of a backbone/dataset/selector spec: its declaration, else the factory's keyword-only
    parameters (typed by their defaults), else ``None`` (undeclared: any key, JSON-or-text values)."""
    from qpmcli.contracts import PluginOption

    opts = getattr(spec, "options", None)
    if opts is not None:
        return {o.name: o for o in opts}
    import inspect

    try:
        params = inspect.signature(spec.factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    out = {}
    for p in params:
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in _RESERVED[kind]:
            continue
        d = p.default
        typ = ("bool" if isinstance(d, bool) else "int" if isinstance(d, int) else "float"
               if isinstance(d, float) else "str" if isinstance(d, str) else "json")
        out[p.name] = PluginOption(p.name, typ, None if d is inspect.Parameter.empty else d)
    return out
