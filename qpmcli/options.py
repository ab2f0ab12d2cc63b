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
        from qpmcli.metricnames import METRIC_GROUPS, PRESETS

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


# ------------------------------------------------------------------------------------------- --help placeholders
ARGUMENT_PLACEHOLDERS = {"run": "RUN", "model": "MODEL", "images": "IMAGE", "inputs": "IMAGE_OR_DIR",
                         "folders": "FOLDER", "name": "NAME"}  # Click adds "..." to the ones that repeat
OPTION_PLACEHOLDERS = {  # long option -> what --help shows after it
    "--model": "RUN|FILE.onnx", "--out": "PATH", "--class": "CLASS", "--compare": "CLASS", "--weights": "FILE",
    "--problem": "FILE", "--weights-dir": "DIR", "--data-root": "DIR", "--cache-dir": "DIR", "--run-dir": "DIR",
    "--backbone": "NAME", "--dataset": "NAME", "--selector": "NAME", "--dataset-option": "KEY=VALUE",
    "--backbone-option": "KEY=VALUE", "--metrics": "NAMES", "--check-images": "IMAGE_OR_DIR",
    "--verify-images": "IMAGE_OR_DIR", "--test-images": "DIR", "--time-limit": "SECONDS", "--port": "PORT",
    "--dense-lr": "LR", "--finetune-lr": "LR", "--coverage": "FRACTION", "--min-agreement": "FRACTION",
    "--min-stability": "FRACTION"}


def _help_mixin() -> type:
    """A mixin for Typer's command and group classes with qpm's ``--help``: an argument's placeholder (RUN) only in
    the name column (Typer adds its type, ``<str>``, beside it) and no placeholder for ``--help`` itself."""
    from typer.core import TyperArgument

    class NamedArgument(TyperArgument):
        def display_type_rich(self, ctx: Any) -> str | None:
            return None

    class QpmHelp:
        def get_help_option(self, ctx: Any) -> Any:
            option = super().get_help_option(ctx)  # type: ignore[misc]
            if option is not None:
                option.metavar = ""
            return option

        def get_params(self, ctx: Any) -> Any:
            params = super().get_params(ctx)  # type: ignore[misc]
            for p in params:
                if type(p) is TyperArgument and p.metavar:
                    p.__class__ = NamedArgument
                elif getattr(p, "is_flag", False) and p.metavar is None:  # Typer's own flags (completion)
                    p.metavar = ""
            return params

    return QpmHelp


def name_placeholders(app: typer.Typer) -> None:
    """Give every argument and option of ``app``'s commands a placeholder that says what to pass (RUN, CLASS, FILE,
    N, ...) instead of Typer's type names (``<str>``, ``<bool>``): flags get none, an explicit ``metavar`` is kept.
    Runs once, after the commands are registered (Typer reads the parameter infos when it builds the CLI)."""
    import inspect
    import typing

    from typer.core import TyperCommand, TyperGroup
    from typer.models import ArgumentInfo, OptionInfo

    mixin = _help_mixin()
    app.info.cls = type("QpmGroup", (mixin, TyperGroup), {})
    infos = list(app.registered_commands)
    for group in app.registered_groups:
        if group.typer_instance:
            group.typer_instance.info.cls = app.info.cls
            infos += list(group.typer_instance.registered_commands)
    for info in infos:
        if info.callback is None:
            continue
        base = info.cls or TyperCommand
        info.cls = type(base.__name__, (mixin, base), {})
        hints = typing.get_type_hints(info.callback)
        for name, param in inspect.signature(info.callback).parameters.items():
            default = param.default
            if not isinstance(default, ArgumentInfo | OptionInfo) or default.metavar is not None:
                continue
            kind = hints.get(name)
            listed = typing.get_origin(kind) is list
            base = typing.get_args(kind)[0] if listed else kind
            if isinstance(default, ArgumentInfo):
                default.metavar = ARGUMENT_PLACEHOLDERS.get(name, name.upper())
                continue
            long = next((d.split("/")[0] for d in default.param_decls or () if d.startswith("--")),
                        "--" + name.replace("_", "-"))
            if base is bool:
                default.metavar = ""
            elif long in OPTION_PLACEHOLDERS:
                default.metavar = OPTION_PLACEHOLDERS[long]
            elif base is int:
                default.metavar = "N"
            elif base is float:
                default.metavar = {"mb": "MB", "ms": "MS"}.get(long.rsplit("-", 1)[-1], "NUMBER")
            else:
                default.metavar = long.rsplit("-", 1)[-1].upper()
