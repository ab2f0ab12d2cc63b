"""One grammar for every command: shared option definitions, the one ``KEY=VALUE`` parser, and the checks that run
before any work (device, output paths, selector sizes, time limits, metric names).

Every check raises :class:`qpmcli.errors.ConfigError` (one line, exit code 2) and lists the valid values. This module
imports no heavy library at import time: ``qpm --help`` loads it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

import typer

from qpmcli.device import ORT_DEVICES
from qpmcli.errors import ConfigError


# ------------------------------------------------------------------------------------------------ shell completion
def _names(kind: str, incomplete: str) -> list[str]:
    try:
        from qpmcli.registry import get_registry

        names = get_registry().names(kind)
    except Exception:  # a broken plugin must not break the user's shell
        return []
    return [n for n in names if n.startswith(incomplete)]


def complete_backbone(incomplete: str) -> list[str]:
    return _names("backbone", incomplete)


def complete_dataset(incomplete: str) -> list[str]:
    return _names("dataset", incomplete)


def complete_selector(incomplete: str) -> list[str]:
    return _names("selector", incomplete)


def complete_device(incomplete: str) -> list[str]:
    return [d for d in ORT_DEVICES if d.startswith(incomplete)]


def complete_metrics(incomplete: str) -> list[str]:
    head, _, last = incomplete.rpartition(",")
    try:
        from qpmcli.metrics import METRIC_GROUPS, PRESETS

        names = [*PRESETS, *METRIC_GROUPS]
    except Exception:
        return []
    return [(head + "," if head else "") + n for n in names if n.startswith(last)]


# ------------------------------------------------------------------------------------------- shared option objects
def dataset_opt(default: Any = None) -> Any:
    return typer.Option(default, "--dataset", "-d", help="Dataset name (see `qpm plugins`).",
                        autocompletion=complete_dataset, show_default=default is not None)


def backbone_opt(default: Any = None) -> Any:
    return typer.Option(default, "--backbone", "-b", help="Backbone name (see `qpm plugins`).",
                        autocompletion=complete_backbone)


def selector_opt(default: str = "qpm") -> Any:
    return typer.Option(default, "--selector", "-s", help="Feature selector (see `qpm plugins`).",
                        autocompletion=complete_selector)


def model_opt(help: str = "Run folder or exported .onnx (default: QPM_MODEL, else the current run).") -> Any:
    return typer.Option(None, "--model", "-m", help=help)


def out_opt(default: Any = None, help: str = "Output path.") -> Any:
    return typer.Option(default, "--out", "-o", help=help)


def quiet_opt() -> Any:
    return typer.Option(False, "--quiet", "-q", help="No progress output.")


def json_opt() -> Any:
    return typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")


def device_opt(tensorrt: bool = False) -> Any:
    choices = "auto, cpu, cuda, cuda:N" + (" or tensorrt" if tensorrt else "")
    return typer.Option(None, "--device", help=f"{choices} (default: the device setting, auto).",
                        autocompletion=complete_device)


def seed_opt() -> Any:
    return typer.Option(None, "--seed", help="Random seed (default: the seed setting).")


def weights_opt() -> Any:
    return typer.Option(None, "--weights", help="Backbone weights file ('random' for random init; default: looked "
                                                "up in the weights folder and local caches).")


def weights_dir_opt() -> Any:
    return typer.Option(None, "--weights-dir", help="Folder with official backbone weight files (weights_dir).")


def data_root_opt() -> Any:
    return typer.Option(None, "--data-root", help="Dataset root folder (overrides QPM_DATA_ROOT / config).")


def coverage_opt() -> Any:
    return typer.Option(None, "--coverage", help="Also give each image its prediction set at this coverage, e.g. "
                                                 "0.9 (needs `qpm conformal RUN --alpha 0.1` first).")


def set_score_opt() -> Any:
    return typer.Option(None, "--set-score", help="With --coverage: the calibration's score, lac, aps or hier "
                                                  "(default: the last one calibrated at that coverage).")


def dataset_option_opt() -> Any:
    return typer.Option(None, "--dataset-option", "-O",
                        help="Dataset option KEY=VALUE, repeatable (typed; see `qpm plugins --json`), e.g. crop=bbox.")


def selector_option_opt() -> Any:
    return typer.Option(None, "--selector-option",
                        help="Selector option KEY=VALUE, repeatable (typed; see `qpm plugins --json`), e.g. bound=lp.")


def backbone_option_opt() -> Any:
    return typer.Option(None, "--backbone-option",
                        help="Backbone option KEY=VALUE, repeatable (typed), e.g. image_size=448.")


# ----------------------------------------------------------------------------------------------- KEY=VALUE options
_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text",
               "size": "a size (224, 224x448 or [224, 448])", "json": "a JSON value or text"}


def _convert(raw: str, typ: str) -> Any:
    """Parse ``raw`` as ``typ``; ``ValueError`` when it is not one."""
    text = raw.strip()
    if typ == "int":
        return int(text)
    if typ == "float":
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(text)
        return value
    if typ == "bool":
        low = text.lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise ValueError(text)
    if typ == "size":
        m = re.fullmatch(r"(\d+)(?:\s*[x,]\s*(\d+))?", text) or re.fullmatch(r"\[\s*(\d+)\s*,\s*(\d+)\s*\]", text)
        if not m:
            raise ValueError(text)
        h, w = int(m.group(1)), int(m.group(2) or m.group(1))
        if h < 1 or w < 1:
            raise ValueError(text)
        return h if m.group(2) is None else [h, w]
    if typ == "json":
        try:
            return json.loads(text)
        except (json.JSONDecodeError, RecursionError):  # not JSON (or nested beyond reason): the text itself
            return raw
    return raw  # str


def parse_plugin_options(kind: str, name: str, pairs: Iterable[str] | None, flag: str | None = None
                         ) -> dict[str, Any]:
    """The one ``KEY=VALUE`` parser: ``--dataset-option``/``--backbone-option``/``--selector-option`` pairs of plugin
    ``name`` of ``kind`` (``dataset``, ``backbone`` or ``selector``), typed by the plugin's declared options. ``-`` in
    keys reads as ``_``.

    An unknown plugin lists the installed ones; an unknown key lists the plugin's options with their types; a value of
    the wrong type names the option and the expected type.
    """
    flag = flag or f"--{kind}-option"
    pairs = list(pairs or [])
    from qpmcli.registry import declared_options, get_registry

    spec = get_registry().get(kind, name)
    declared = declared_options(kind, spec)
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ConfigError(f"{flag} {pair!r} is not KEY=VALUE (e.g. {flag} {_example(declared)})")
        if declared is None:
            out[key] = _convert(raw, "json")
            continue
        opt = declared.get(key)
        if opt is None:
            raise ConfigError(f"{kind} {name!r} has no option {key!r}; its options: {_listing(declared)}")
        try:
            value = _convert(raw, opt.type)
        except ValueError:
            raise ConfigError(f"{flag} {key}={raw!r}: {kind} {name!r} option {key!r} expects "
                              f"{_TYPE_NAMES.get(opt.type, opt.type)}") from None
        if opt.choices and value not in opt.choices:
            raise ConfigError(f"{flag} {key}={raw!r}: {kind} {name!r} option {key!r} must be one of "
                              f"{', '.join(map(str, opt.choices))}")
        out[key] = value
    return out


def _listing(declared: dict[str, Any]) -> str:
    if not declared:
        return "none"
    return ", ".join(f"{o.name} ({o.type}" + (f": {'|'.join(map(str, o.choices))}" if o.choices else "")
                     + (f", default {o.default}" if o.default is not None else "") + ")" for o in declared.values())


def _example(declared: dict[str, Any] | None) -> str:
    if declared:
        o = next(iter(declared.values()))
        return f"{o.name}={o.choices[0] if o.choices else o.default}"
    return "key=value"


def check_set_options(coverage: float | None, set_score: str | None) -> None:
    """``--coverage`` in (0, 1) and ``--set-score`` one of the conformal scores, only together."""
    from qpmcli.checks import check_choice
    from qpmcli.conformal import SCORES, check_coverage

    if coverage is not None:
        check_coverage(coverage)
    if set_score is not None:
        if coverage is None:
            raise ConfigError("--set-score needs --coverage (e.g. --coverage 0.9)")
        check_choice(set_score, SCORES, "--set-score")
