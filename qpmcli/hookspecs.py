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

    Each spec names a frozen feature extractor (e.g. ``dinov2-vitb14``) and a factory that qpm calls with keywords
    only -- always these six, plus the user's ``--backbone-option KEY=VALUE`` pairs::

        factory(*, name, weights, preprocess, settings, dataset, amp, **options) -> Backbone

    ``name``: the requested name; ``weights``: a file path, ``"random"`` or ``None`` (look it up; see
    :func:`qpmcli.backbone.resolve_weights`); ``preprocess``: ``"official"`` or ``"reference"``; ``settings``: the
    :class:`qpmcli.settings.QpmSettings`; ``dataset``: the dataset name or ``None``; ``amp``: bf16 autocast wanted.
    Declare the options in ``BackboneSpec.options`` (:class:`qpmcli.contracts.PluginOption`) or as further keyword-only
    parameters. Set ``prefix=True`` to serve every name that starts with the spec's name (``timm:`` serves
    ``timm:resnet18``).

    The returned object must satisfy :class:`qpmcli.contracts.Backbone`; the simplest way is
    :func:`qpmcli.backbone.build_frozen_backbone`, given a function that creates the ``torch.nn.Module`` (its
    ``forward_features(x)`` returns tokens ``[B, P + h*w, D]`` with ``P = num_prefix_tokens``, or a feature map
    ``[B, D, h, w]`` with ``layout="map"``), the weights file or ``None``, and the mean/std. Example::

        def build_tiny(*, name, weights, preprocess, settings, dataset, amp, image_size=224):
            from qpmcli.backbone import build_frozen_backbone, resolve_weights

            path = resolve_weights(weights, settings, filenames=["tiny.pth"], source="https://...", backbone=name)
            return build_frozen_backbone(name=name, create=lambda: TinyNet(), weights_path=path,
                                         image_size=(image_size, image_size), layout="map", preprocess=preprocess,
                                         dataset=dataset, amp=amp)

        @hookimpl
        def qpm_backbones():
            return [BackboneSpec("tiny", build_tiny, "a tiny CNN", embed_dim=64, patch_size=32)]
    """


@hookspec
def qpm_datasets() -> list:
    """Return a list of :class:`qpmcli.contracts.DatasetSpec` this plugin provides.

    Each spec names a dataset (e.g. ``cub200``) and a factory that qpm calls as
    ``factory(root, split, **options) -> Dataset``: ``root`` is a :class:`pathlib.Path` (or ``None`` when the spec
    says ``needs_root=False`` and no root was given), ``split`` is ``"train"`` or ``"test"``, ``options`` the
    ``--dataset-option KEY=VALUE`` pairs. The result is a :class:`qpmcli.contracts.Dataset` subclass (``name``,
    ``split``, ``classes``, ``__len__``, ``__getitem__`` returning a :class:`qpmcli.contracts.Sample`).
    A missing or malformed dataset must raise :class:`qpmcli.errors.DatasetError` naming the expected layout.
    Example::

        @hookimpl
        def qpm_datasets():
            return [DatasetSpec("my-birds", MyBirds, "My bird photos", needs_root=True)]
    """


@hookspec
def qpm_selectors() -> list:
    """Return a list of :class:`qpmcli.contracts.SelectorSpec` this plugin provides.

    Each spec names a feature selector (e.g. ``qpm``) and a factory ``factory(**options) -> Selector``; ``options``
    are the user's ``--selector-option KEY=VALUE`` pairs, typed by the spec's declared ``options``
    (:class:`qpmcli.contracts.PluginOption`; a selector without options takes none). qpm calls
    ``selector.select(problem, *, n_features, per_class, time_limit, seed, workers, previous, progress)`` with a
    :class:`qpmcli.contracts.SelectionProblem` and expects a :class:`qpmcli.contracts.Selection`: ``features`` (the
    sorted indices of ``n_features`` dense features) and ``weight [C, n_features]`` (binary with ``per_class`` ones per
    row, unless ``trainable_norm``). ``iterations`` (default 1) and ``finetune_schedule(i)`` serve iterative selectors.
    Example::

        @hookimpl
        def qpm_selectors():
            return [SelectorSpec("random", RandomSelector, "k random features per class")]
    """
