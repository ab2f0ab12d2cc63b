"""Built-in qpm datasets: cub200, stanford-cars, fgvc-aircraft, imagefolder, digits, shapes.

This module stays light (it is imported by ``qpm plugins``): each factory imports its implementation on first use.
"""

from __future__ import annotations

from typing import Any

from qpmcli.contracts import DatasetSpec, PluginOption
from qpmcli.errors import DatasetError
from qpmcli.hookspecs import hookimpl

from ._common import AIRCRAFT_SOURCE, CARS_SOURCE, CUB_SOURCE, IMAGEFOLDER_SOURCE


def build(cls: type, root: Any, split: str, options: dict[str, Any]):
    """Construct ``cls`` after checking ``options`` against its keyword-only parameters (a clear error lists them)."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    accepted = {n: p.default for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        listed = ", ".join(f"{n}={v!r}" for n, v in accepted.items()) or "none"
        raise DatasetError(f"dataset {cls.name!r} has no option(s) {', '.join(unknown)}; its options: {listed}")
    return cls(root, split, **options)


def cub200(root: Any, split: str = "train", **options: Any):
    from .cub import CUB200

    return build(CUB200, root, split, options)


def stanford_cars(root: Any, split: str = "train", **options: Any):
    from .cars import StanfordCars

    return build(StanfordCars, root, split, options)


def fgvc_aircraft(root: Any, split: str = "train", **options: Any):
    from .aircraft import FGVCAircraft

    return build(FGVCAircraft, root, split, options)


def imagefolder(root: Any, split: str = "train", **options: Any):
    from .folder import ImageFolder

    return build(ImageFolder, root, split, options)


def digits(root: Any = None, split: str = "train", **options: Any):
    from .synthetic import Digits

    return build(Digits, root, split, options)


def shapes(root: Any = None, split: str = "train", **options: Any):
    from .synthetic import Shapes

    return build(Shapes, root, split, options)


# The options each dataset accepts (--dataset-option KEY=VALUE), typed for the CLI's one parser.
_SEED = PluginOption("seed", "int", 0, "seed of the generated data / hold-out split")
CUB_OPTIONS = (PluginOption("crop", "str", "none", "crop images to the bounding box", ("none", "bbox")),)
IMAGEFOLDER_OPTIONS = (PluginOption("test_fraction", "float", 0.2, "hold-out fraction for a one-tree layout"), _SEED)
DIGITS_OPTIONS = (PluginOption("image_size", "int", 64, "side of the rendered images"),
                  PluginOption("test_fraction", "float", 0.25, "test fraction of the stratified split"), _SEED)
SHAPES_OPTIONS = (PluginOption("n_classes", "int", 10, "number of classes"),
                  PluginOption("per_class", "int", 40, "training images per class"),
                  PluginOption("test_per_class", "int", 20, "test images per class"),
                  PluginOption("image_size", "int", 128, "side of the rendered images"),
                  PluginOption("parts_per_class", "int", 3, "coloured parts per object (2..6)"), _SEED,
                  PluginOption("cue_classes", "int", 0, "the first N classes get a spurious cue (a white square) on "
                                                        "their training images"),
                  PluginOption("cue_test", "bool", False, "also draw the cue on those classes' test images"),
                  PluginOption("cue_twins", "bool", False, "make each cued class a near twin (one part recoloured) "
                                                           "of an uncued class"))


@hookimpl
def qpm_datasets() -> list:
    return [
        DatasetSpec("cub200", cub200, "CUB-200-2011 birds (200 classes, masks, attributes)", True, CUB_SOURCE,
                    options=CUB_OPTIONS),
        DatasetSpec("stanford-cars", stanford_cars, "Stanford Cars (196 classes)", True, CARS_SOURCE, options=()),
        DatasetSpec("fgvc-aircraft", fgvc_aircraft, "FGVC-Aircraft, variant level (100 classes)", True,
                    AIRCRAFT_SOURCE, options=()),
        DatasetSpec("imagefolder", imagefolder, "your own images in one folder per class", True, IMAGEFOLDER_SOURCE,
                    options=IMAGEFOLDER_OPTIONS),
        DatasetSpec("digits", digits, "scikit-learn handwritten digits (ships with qpm; 10 classes, ink masks)",
                    False, "scikit-learn (installed with qpm)", options=DIGITS_OPTIONS),
        DatasetSpec("shapes", shapes, "synthetic coloured-part objects (no download; masks, class x part matrix)",
                    False, "generated on the fly", options=SHAPES_OPTIONS),
    ]
