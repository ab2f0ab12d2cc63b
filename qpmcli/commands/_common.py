"""Helpers shared by the CLI commands: option definitions (from :mod:`qpmcli.options`), settings with the up-front
device check, JSON output, consoles."""

from __future__ import annotations

import sys
from typing import Any

from qpmcli import options as opts
from qpmcli.device import check_device

# Shared option objects (the same long and short names in every command); see qpmcli/options.py.
DataRoot = opts.data_root_opt()
WeightsDir = opts.weights_dir_opt()
Weights = opts.weights_opt()
Device = opts.device_opt()
Seed = opts.seed_opt()
JsonFlag = opts.json_opt()
Quiet = opts.quiet_opt()


def settings_from_flags(*, device_check: str | None = "plain", **flags: Any):
    """Resolve settings with the given CLI flags on top (``None`` = flag not given) and check the resulting device
    before any work: ``device_check`` ``"plain"`` (driver check), ``"torch"`` (also a CUDA build of torch),
    ``"ort"`` (tensorrt allowed) or ``None`` (the command uses no device)."""
    from qpmcli.settings import resolve_settings

    settings, sources = resolve_settings(**flags)
    if device_check is not None:
        flag = "--device" if flags.get("device") else f"device setting ({sources['device']})"
        check_device(settings.device, torch=device_check == "torch", flag=flag)
    return settings


def ort_device(device: str | None, settings: Any) -> str:
    """The ONNX Runtime device of predict/explain/serve: the flag, else the setting; checked up front."""
    from qpmcli.settings import resolve_settings

    if device:
        return check_device(device, tensorrt=True)
    _, sources = resolve_settings()
    return check_device(settings.device, tensorrt=True, flag=f"device setting ({sources['device']})")


def say(line: str) -> None:
    """One informational line on stderr (keeps stdout clean for --json)."""
    console(stderr=True).print(line, highlight=False, markup=False)


def print_json(obj: Any) -> None:
    """Write ``obj`` as JSON to stdout, with the same conversions as the run files (paths, numpy/torch values)."""
    from qpmcli.artifact import to_json

    sys.stdout.write(to_json(obj) + "\n")


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True)  # never hard-wrap paths users copy; tables still fit the width


def set_line(detail: dict, most: int = 5) -> str:
    """One image's set as one line: its members (the first ``most``), the ranked features they share, and the
    next feature of each member's ranking, members with the same next feature together (the set's tree, in words)."""
    from qpmcli.conformal import set_feature_label

    head = f"{100 * detail['coverage']:g}% set ({detail['score']}): "
    if not detail["set"]:
        return head + "empty (even the top class is less sure than the calibrated level allows)"
    members = detail["members"][:most]
    more = f", +{detail['size'] - len(members)} more" if detail["size"] > len(members) else ""
    names = ", ".join(m["class"] for m in members) + more
    shared = detail.get("shared_features")
    if shared is None or detail["size"] < 2:
        return head + names
    if not shared:
        return head + names + "; no shared leading feature"
    groups: dict[int | None, list[str]] = {}  # the next feature of each member's ranking, in the members' order
    for m in members:
        groups.setdefault(m["diverges_at"], []).append(m["class"])
    nexts = [(f"{set_feature_label(detail, f)} for " if f is not None else "nothing more for ") + ", ".join(classes)
             for f, classes in groups.items()]
    return (head + names + f"; all rank {', '.join(set_feature_label(detail, f) for f in shared)} first, then "
            + "; ".join(nexts) + more)
