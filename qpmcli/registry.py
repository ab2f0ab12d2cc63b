"""Plugin discovery: the pluggy manager, loaded from the ``qpm`` entry-point group, and name lookup.

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
                try:
                    specs = impl.function() or []
                except Exception as exc:  # a broken third-party plugin must name itself
                    raise PluginError(f"plugin {plugin_name!r} from package {package!r} failed in "
                                      f"{_HOOKS[kind]}(): {exc}") from exc
                for spec in specs:
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
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    if load_entrypoints:
        try:
            pm.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)
        except Exception as exc:
            raise PluginError(f"a qpm plugin failed to load: {exc}") from exc
    return pm


@functools.cache
def get_registry() -> Registry:
    """The process-wide registry of installed plugins (built once, on first use)."""
    return Registry(make_plugin_manager())
