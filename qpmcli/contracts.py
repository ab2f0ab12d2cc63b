"""The contracts between qpm's core and its plugins (backbones, datasets, selectors).

The core knows only these types. This module is imported by the plugin manager and must stay light: no torch or numpy
at import time (type hints only).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from PIL import Image


# ----------------------------------------------------------------------------------------------------- plugin options
@dataclass(frozen=True)
class PluginOption:
    """One option a backbone, dataset or selector plugin accepts (``--backbone-option``/``--dataset-option``/
    ``--selector-option KEY=VALUE``; ``qpm plugins --json`` lists them).

    ``type`` says how the CLI parses VALUE: ``int``, ``float``, ``bool``, ``str``, ``size`` (``224``, ``224x448`` or
    ``[224, 448]``) or ``json`` (any JSON value; text that is not JSON stays text). ``choices`` restricts the value.
    A wrong key or type is a one-line error naming the option and its type (``qpmcli.options.parse_plugin_options``).
    """

    name: str
    type: str = "str"
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] = ()


# --------------------------------------------------------------------------------------------------------- backbones
@dataclass(frozen=True)
class BackboneSpec:
    """A named backbone. qpm calls its factory with keywords only, always these six, plus the user's options::

        factory(name=str, weights=str | None, preprocess="official" | "reference", settings=QpmSettings,
                dataset=str | None, amp=bool, **options) -> Backbone

    ``name`` is the requested name (with ``prefix=True`` the spec's name is a prefix: ``timm:`` serves every
    ``timm:<model>``). ``weights`` is an explicit file, ``"random"`` (random init for tests) or ``None`` (then the
    factory looks in ``settings.weights_dir`` under ``weights_filename``, then in local timm/Hugging Face caches, else
    raises :class:`qpmcli.errors.WeightsError`). ``dataset`` names the dataset (for ``preprocess="reference"``
    statistics); ``amp`` asks for bf16 autocast. ``options`` are the ``--backbone-option KEY=VALUE`` pairs, as declared
    in ``options`` (or the factory's other keyword-only parameters). :func:`qpmcli.backbone.build_frozen_backbone`
    builds a conforming :class:`Backbone` from a model-creating function.
    """

    name: str
    factory: Callable[..., Backbone]
    description: str = ""
    embed_dim: int | None = None
    patch_size: int | None = None
    weights_filename: str | None = None
    weights_source: str | None = None
    options: tuple[PluginOption, ...] | None = None  # None: undeclared (keyword-only factory parameters are used)
    prefix: bool = False  # True: ``name`` is a prefix and the spec serves every name that starts with it
    # ``find_weights(settings) -> path``: where the factory would find its weights with these settings (the same
    # lookup it makes), raising WeightsError naming what is missing where; ``qpm doctor`` reports it. None: the
    # plugin's weights are looked for as ``weights_dir / weights_filename``.
    find_weights: Callable[[Any], Any] | None = None


@runtime_checkable
class Backbone(Protocol):
    """A frozen feature extractor (a ``torch.nn.Module`` in eval mode with ``requires_grad=False``; qpm moves it with
    ``.to(device)``).

    ``backbone(x)`` takes a preprocessed batch ``[B, 3, H, W]`` and returns ``(cls [B, D], patches [B, h*w, D])``:
    final-norm tokens, registers dropped, patches in row-major grid order. :class:`qpmcli.backbone.FrozenBackbone`
    (built by :func:`qpmcli.backbone.build_frozen_backbone`) implements all of it.
    """

    name: str
    embed_dim: int
    patch_size: int
    image_size: tuple[int, int]
    grid: tuple[int, int]  # (h, w) of the patch grid at image_size
    weights_digest: str  # sha256 (hex, first 16 chars) of the loaded weights, "random" for random init
    preprocess_config: dict[str, Any]  # JSON-able: mode, mean, std, size, ... (stored in caches and artifacts)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Turn any PIL image (grayscale, palette, CMYK, alpha, EXIF-rotated) into a float tensor ``[3, H, W]``."""

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    @property
    def device(self) -> torch.device:
        """Where the weights are (inputs are moved there)."""

    def raw_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cls, patches)`` without autocast or no-grad (what ``qpm export`` traces into the ONNX graph)."""

    def describe(self) -> dict[str, Any]:
        """JSON-able facts stored with token caches (name, embed_dim, patch_size, image_size, grid, digest...)."""


# ---------------------------------------------------------------------------------------------------------- datasets
@dataclass
class Sample:
    """One dataset item. ``mask`` is a boolean object mask ``[H, W]`` at the image's resolution, or ``None``."""

    image: Image.Image
    label: int
    mask: np.ndarray | None = None
    path: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset. ``factory(root, split, **options) -> Dataset``; ``split`` is ``"train"`` or ``"test"``."""

    name: str
    factory: Callable[..., Dataset]
    description: str = ""
    needs_root: bool = True
    source: str | None = None  # where users obtain the data (printed in errors)
    options: tuple[PluginOption, ...] | None = None  # None: undeclared (keyword-only factory parameters are used)


class Dataset(ABC):
    """Base class for dataset plugins: a finite, indexable sequence of :class:`Sample`.

    Subclasses set ``name``, ``split``, ``classes`` and implement ``__len__``/``__getitem__``/``label``.
    """

    name: str = ""
    split: str = "train"
    classes: list[str]

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> Sample: ...

    def label(self, index: int) -> int:
        """The label of item ``index`` without decoding its image (fast; used for caches and statistics)."""
        return self[index].label

    def labels(self) -> list[int]:
        return [self.label(i) for i in range(len(self))]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_masks(self) -> bool:
        """True when items carry object masks (needed for the plausibility metric)."""
        return False

    def class_attributes(self) -> np.ndarray | None:
        """A ``[C, A]`` class-attribute matrix (e.g. CUB's continuous attributes) or ``None``."""
        return None

    def path(self, index: int) -> str | None:
        """A stable identifier of item ``index`` (its file for image files), ideally without decoding the image.

        ``qpm name-features --attributes FILE.csv`` matches the file's ``image`` column against it. The default
        decodes the item and returns ``Sample.path``; datasets of files override it.
        """
        return self[index].path

    # Optional per-image attributes (the alignment metric and ``qpm name-features``). A dataset without them keeps
    # these defaults and works everywhere else; its users can still pass an attribute table as a CSV file.
    @property
    def has_image_attributes(self) -> bool:
        """True when :meth:`image_attributes` returns per-image attribute labels."""
        return False

    def image_attributes(self) -> np.ndarray | None:
        """bool ``[N, A]`` in item order: attribute ``a`` is present in item ``i``. Only entries that
        :meth:`image_attribute_known` marks as known are read (present or absent); the others may hold anything."""
        return None

    def image_attribute_known(self) -> np.ndarray | None:
        """bool ``[N, A]``: the labels the dataset is sure of (CUB: certainty >= 3). An unknown label puts the image
        in neither the "with" nor the "without" group of an attribute. ``None`` (the default): every label is known."""
        return None

    def attribute_names(self) -> list[str] | None:
        """The ``A`` attribute names in column order (CUB: ``has_wing_color::blue``), the words
        ``qpm name-features`` names features with; ``None`` (the default): "attribute 1", "attribute 2", ..."""
        return None

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able facts that identify this dataset split for cache keys (name, split, size, options)."""
        return {"name": self.name, "split": self.split, "size": len(self), "classes": len(self.classes)}


# --------------------------------------------------------------------------------------------------------- selectors
@dataclass
class SelectionProblem:
    """Input of a selector. ``A`` [n_f, C] feature-class similarity, ``R`` [n_f, n_f] feature-feature similarity.

    ``features``/``labels`` (pooled dense train features [N, n_f] and labels [N]) are present when the problem comes
    from a trained dense model; selectors that fit a GLM (sldd, qsenn) need them. ``B`` is the optional locality bias.
    ``threshold_rule`` names how selectors that penalise redundant pairs find the redundancy threshold
    (``qpmcli.selection.THRESHOLD_RULES``: ``"reference"``, or the deviation ``"greedy-bisect"``).
    """

    A: np.ndarray
    R: np.ndarray
    features: np.ndarray | None = None
    labels: np.ndarray | None = None
    B: np.ndarray | None = None
    class_names: list[str] | None = None
    threshold_rule: str = "reference"

    @property
    def n_features_total(self) -> int:
        return int(self.A.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.A.shape[1])


@dataclass
class Selection:
    """Output of a selector.

    ``features``: sorted indices (length K) into the dense features; ``weight``: [C, K] class-feature weights
    (binary for QPM; real or ternary for SLDD/Q-SENN); ``bias``: [C] or None; ``trainable_norm``: whether finetuning
    also learns the feature normalisation (SLDD/Q-SENN). ``objective``/``bound``/``gap``/``status``/``seconds``
    report the solve.
    """

    features: np.ndarray
    weight: np.ndarray
    bias: np.ndarray | None = None
    trainable_norm: bool = False
    objective: float | None = None
    bound: float | None = None
    gap: float | None = None
    status: str = "UNKNOWN"
    seconds: float = 0.0
    solver: str = ""
    params: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Selector(Protocol):
    """Turns a :class:`SelectionProblem` into a :class:`Selection`.

    ``iterations`` > 1 marks an iterative selector (Q-SENN): the trainer calls ``select`` once per iteration with a
    problem recomputed from the current model and the ``previous`` selection, and finetunes with
    ``finetune_schedule(iteration)`` (a dict of overrides such as epochs and lr), so the core needs no special case.
    """

    name: str
    iterations: int

    def select(
        self,
        problem: SelectionProblem,
        *,
        n_features: int = 50,
        per_class: int = 5,
        time_limit: float = 60.0,
        seed: int = 0,
        workers: int = 8,
        previous: Selection | None = None,
        progress: bool = True,
    ) -> Selection: ...

    def finetune_schedule(self, iteration: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SelectorSpec:
    """A named selector. ``factory(**options) -> Selector``: ``options`` are the ``--selector-option KEY=VALUE``
    pairs (``qpmcli.selection.select(..., selector_options=...)``), as declared in ``options`` (or the factory's
    keyword-only parameters); a selector without options has ``factory()``."""

    name: str
    factory: Callable[..., Selector]
    description: str = ""
    options: tuple[PluginOption, ...] | None = None  # None: undeclared (keyword-only factory parameters are used)
