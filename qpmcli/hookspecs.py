"""The hooks a qpm plugin can implement. Every hook is declared here once; its docstring is its documentation.

A plugin is any module or object registered under the entry-point group ``qpm``::

    # pyproject.toml of a third-party package
    [project.entry-points.qpm]
    my-backbones = "my_package.qpm_plugin"

    # my_package/qpm_plugin.py
    from qpmcli.hookspecs import hookimpl
    from qpmcli.contracts import BackboneSpec

    @hookimpl
    def qpm_backbones():
        return [BackboneSpec(name="my-vit", factory=build_my_vit, description="...")]

Plugin modules are imported by ``qpm plugins`` and ``qpm --help``-adjacent commands: keep them light (no torch import
at module level; import heavy libraries inside the factories).
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "qpm"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def qpm_backbones() -> list:
    """Return a list of :class:`qpmcli.contracts.BackboneSpec` this plugin provides.

    Each spec names a frozen feature extractor (e.g. ``dinov2-vitb14``) and a factory
    ``factory(weights: str | None, preprocess: str, settings) -> Backbone`` that builds it.
    Example::

        @hookimpl
        def qpm_backbones():
            return [BackboneSpec("dinov2-vits14", build_dinov2_vits14, "DINOv2 ViT-S/14", embed_dim=384, patch_size=14)]
    """


@hookspec
def qpm_datasets() -> list:
    """Return a list of :class:`qpmcli.contracts.DatasetSpec` this plugin provides.

    Each spec names a dataset (e.g. ``cub200``) and a factory ``factory(root, split, **options) -> Dataset``.
    A missing or malformed dataset must raise :class:`qpmcli.errors.DatasetError` naming the expected layout.
    Example::

        @hookimpl
        def qpm_datasets():
            return [DatasetSpec("my-birds", MyBirds, "My bird photos", needs_root=True)]
    """


@hookspec
def qpm_selectors() -> list:
    """Return a list of :class:`qpmcli.contracts.SelectorSpec` this plugin provides.

    Each spec names a feature selector (e.g. ``qpm``) and a factory ``factory() -> Selector``; a selector turns a
    :class:`qpmcli.contracts.SelectionProblem` into a :class:`qpmcli.contracts.Selection`.
    Example::

        @hookimpl
        def qpm_selectors():
            return [SelectorSpec("random", RandomSelector, "k random features per class")]
    """
