"""``qpm doctor``: what a user checks before hours of work, in one report.

Python; PyTorch with its CUDA and cuDNN and the visible GPUs; ONNX Runtime's version and providers, where the CUDA and
TensorRT providers are tried on a tiny graph so that the reason one fails to load is shown (ONNX Runtime itself only
logs it and falls back to the CPU); OR-Tools; each built-in backbone's weights (found where, or not); each dataset
that needs a root checked against the configured ``data_root``; the cache folder (writable, free space).

Each check is ``{"name", "ok", "detail", "needed"}``; ``needed`` marks what the configured defaults (the backbone,
dataset and device ``qpm train`` would use) require. The exit code is 0 when every needed check passes.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_BACKBONE = "dinov2-vitb14-reg"  # qpm train's defaults
DEFAULT_DATASET = "cub200"
MIN_FREE_GIB = 1.0  # below this the cache folder cannot hold a token cache of any real dataset


def _check(name: str, ok: bool | None, detail: str, needed: bool = False, **extra: Any) -> dict[str, Any]:
    return {"name": name, "ok": ok, "detail": detail, "needed": needed, **extra}


# ------------------------------------------------------------------------------------------------------ libraries
def check_python() -> dict[str, Any]:
    ok = sys.version_info >= (3, 11)
    return _check("python", ok, f"{platform.python_version()} ({sys.executable})" + ("" if ok else "; need >= 3.11"),
                  needed=True, version=platform.python_version())


def check_torch(device: str) -> list[dict[str, Any]]:
    try:
        import torch
    except Exception as exc:  # a broken install is reported, not raised
        return [_check("torch", False, f"cannot import torch: {exc}", needed=True)]
    cuda_build = torch.version.cuda
    out = [_check("torch", True, f"{torch.__version__} (CUDA build: {cuda_build or 'none, CPU only'})", needed=True,
                  version=torch.__version__, cuda_build=cuda_build)]
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # cuDNN missing from a CUDA build
        cudnn = None
    out.append(_check("cudnn", cudnn is not None, f"cuDNN {cudnn}" if cudnn else "not available", version=cudnn))
    wants_gpu = device.startswith("cuda")
    try:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        names = [torch.cuda.get_device_name(i) for i in range(n)]
    except Exception as exc:
        n, names = 0, [f"error: {exc}"]
    detail = ", ".join(f"cuda:{i} {nm}" for i, nm in enumerate(names)) if n else (
        "no GPU visible to PyTorch" + ("" if cuda_build else " (CPU-only build)"))
    out.append(_check("gpu", n > 0, detail, needed=wants_gpu, devices=names))
    return out


_TINY: bytes | None = None


def _tiny_onnx() -> bytes:
    """A one-node graph (y = x + x) to open sessions with."""
    global _TINY
    if _TINY is None:
        from onnx import TensorProto, helper

        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
        graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "doctor", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        _TINY = model.SerializeToString()
    return _TINY


def _capture_output(fn):
    """Run ``fn()`` while the process's stdout and stderr (fds 1 and 2: ONNX Runtime's C++ logger writes there) go to
    a file and Python's ``sys.stdout``/``sys.stderr`` (its Python fallback message) to a buffer, wherever they pointed
    (a terminal, or a caller's redirection); returns ``(result or exception, captured text)``."""
    import contextlib
    import io

    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    py_text = io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        for fd in saved:
            os.dup2(tmp.fileno(), fd)
        try:
            with contextlib.redirect_stdout(py_text), contextlib.redirect_stderr(py_text):
                try:
                    result: Any = fn()
                except Exception as exc:  # the provider's own error is the answer we want
                    result = exc
        finally:
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
        tmp.seek(0)
        text = tmp.read().decode("utf-8", "replace")
    return result, text + py_text.getvalue()


def _reason(text: str) -> str:
    """The useful part of ONNX Runtime's output: the failing lines without colours, timestamps and source paths."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "*****" not in ln]
    keys = ("fail", "error", "cannot", "not found", "unable", "no such", "require")
    picked = [ln for ln in lines if any(k in ln.lower() for k in keys)] or lines
    msgs = []
    for ln in picked:
        ln = ln.split(" : FAIL : ", 1)[-1]  # "[ONNXRuntimeError] : 1 : FAIL : <message>"
        ln = re.sub(r"^\d{4}-\d\d-\d\d [\d:.]+ \[[^\]]*\] ", "", ln)  # "<time> [E:onnxruntime:..., file:line fn]"
        msgs.append(ln)
    return " | ".join(dict.fromkeys(msgs))[:700]


def probe_provider(provider: str) -> dict[str, Any]:
    """Open a tiny session with ``provider`` first: did it load, and if not, why (error or ORT's log)."""
    import onnxruntime as ort

    def make():
        opts = ort.SessionOptions()
        opts.log_severity_level = 1  # keep warnings: a provider that fails to load is only logged
        return ort.InferenceSession(_tiny_onnx(), sess_options=opts, providers=[provider, "CPUExecutionProvider"])

    result, text = _capture_output(make)
    if isinstance(result, Exception):
        return {"loaded": False, "reason": _reason(f"{type(result).__name__}: {result}\n{text}")}
    active = result.get_providers()
    if active and active[0] == provider:
        return {"loaded": True, "reason": None}
    return {"loaded": False, "reason": _reason(text) or f"ONNX Runtime fell back to {', '.join(active)}"}


def check_onnxruntime(device: str) -> list[dict[str, Any]]:
    try:
        import onnxruntime as ort
    except Exception as exc:
        return [_check("onnxruntime", False, f"cannot import onnxruntime: {exc}", needed=True)]
    available = ort.get_available_providers()
    out = [_check("onnxruntime", True, f"{ort.__version__}; providers: {', '.join(available)}", needed=True,
                  version=ort.__version__, providers=available)]
    for label, provider in (("onnxruntime CUDA", "CUDAExecutionProvider"),
                            ("onnxruntime TensorRT", "TensorrtExecutionProvider")):
        if provider not in available:
            out.append(_check(label, False, f"{provider} is not in this build (install onnxruntime-gpu)",
                              provider=provider, loaded=False, reason="not in this build"))
            continue
        res = probe_provider(provider)
        detail = "loads" if res["loaded"] else f"fails to load: {res['reason']}"
        out.append(_check(label, res["loaded"], detail, needed=False, provider=provider, **res))
    return out


def check_ortools() -> dict[str, Any]:
    try:
        import ortools

        return _check("ortools", True, ortools.__version__, needed=True, version=ortools.__version__)
    except Exception as exc:
        return _check("ortools", False, f"cannot import ortools: {exc}", needed=True)


# ----------------------------------------------------------------------------------------------- plugins and data
def backbone_weights(name: str, spec: Any, settings: Any) -> tuple[bool | None, str]:
    """Whether the backbone's weights are on disk, and where (or what is expected where)."""
    from qpmcli.errors import QpmError

    if getattr(spec, "prefix", False):
        return None, spec.description or "weights via --weights"
    find = getattr(spec, "find_weights", None)
    if find is not None:  # the plugin's own lookup, the one its factory makes
        try:
            return True, str(find(settings))
        except QpmError as exc:
            return False, str(exc)
    filename = getattr(spec, "weights_filename", None)
    if filename:
        path = Path(settings.weights_dir) / filename
        return (True, str(path)) if path.is_file() else (False, f"expected {path}")
    return None, "the plugin declares no weights file"


def check_backbones(settings: Any, default: str) -> list[dict[str, Any]]:
    from qpmcli.registry import get_registry

    out = []
    for entry in get_registry().entries("backbone"):
        if entry.package != "qpm" and entry.name != default:
            continue  # built-in backbones, and the one asked for
        ok, detail = backbone_weights(entry.name, entry.spec, settings)
        out.append(_check(f"backbone {entry.name}", ok, detail, needed=entry.name == default, backbone=entry.name))
    return out


def check_datasets(settings: Any, default: str) -> list[dict[str, Any]]:
    """``qpm data check`` of every dataset that needs a root, against the configured ``data_root``."""
    from qpmcli.data import check_dataset
    from qpmcli.errors import QpmError
    from qpmcli.registry import get_registry

    reg = get_registry()
    spec = reg.get("dataset", default)
    out = []
    if not spec.needs_root:
        out.append(_check(f"dataset {default}", True, "ships with qpm (no root needed)", needed=True, dataset=default))
    if settings.data_root is None:
        if spec.needs_root:
            out.append(_check(f"dataset {default}", False, "no data_root configured (set QPM_DATA_ROOT or data_root "
                                                           "in qpm.toml)", needed=True, dataset=default))
        return out
    for entry in reg.entries("dataset"):
        if not entry.spec.needs_root:
            continue
        try:
            report = check_dataset(entry.name, root=None, settings=settings)
            counts = ", ".join(f"{s} {v['count']}" for s, v in report["splits"].items())
            ok, detail = True, f"data check passes at {settings.data_root}: {report['classes']} classes, {counts}"
        except QpmError as exc:
            ok, detail = False, f"data check fails at {settings.data_root}: {exc}"
        except Exception as exc:  # a broken third-party dataset plugin is a finding, not a crash
            ok, detail = False, f"data check crashed: {type(exc).__name__}: {exc}"
        out.append(_check(f"dataset {entry.name}", ok, detail, needed=entry.name == default, dataset=entry.name))
    return out


def check_cache_dir(settings: Any) -> dict[str, Any]:
    path = Path(settings.cache_dir)
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return _check("cache dir", False, f"{path}: {probe} is not a folder", needed=True, path=str(path))
    writable = os.access(probe, os.W_OK | os.X_OK)
    if writable:
        try:
            tempfile.NamedTemporaryFile(dir=probe, prefix=".qpm-doctor-").close()  # create + delete: the real test
        except OSError:
            writable = False
    free = shutil.disk_usage(probe).free / 2**30
    where = "" if probe == path else f" (created on first use under {probe})"
    roomy = free >= MIN_FREE_GIB
    room = "" if roomy else (f" (less than {MIN_FREE_GIB:g} GiB: token caches will not fit; CUB-200 with ViT-B/14 "
                             f"takes about 5 GiB; free space or set cache_dir)")
    return _check("cache dir", writable and roomy, f"{path}{where}: {'writable' if writable else 'NOT writable'}, "
                                                   f"{free:.1f} GiB free{room}", needed=True, path=str(path),
                  free_gib=round(free, 3))


def run_doctor(settings: Any, backbone: str = DEFAULT_BACKBONE, dataset: str = DEFAULT_DATASET,
               datasets: bool = True) -> dict[str, Any]:
    """Every check; ``ready`` is whether every ``needed`` one passes."""
    from qpmcli.registry import get_registry

    get_registry().get("backbone", backbone)
    get_registry().get("dataset", dataset)
    device = settings.device
    checks = [check_python(), *check_torch(device), *check_onnxruntime(device), check_ortools(),
              *check_backbones(settings, backbone)]
    if datasets:
        checks += check_datasets(settings, dataset)
    checks.append(check_cache_dir(settings))
    missing = [c["name"] for c in checks if c["needed"] and not c["ok"]]
    return {"ready": not missing, "missing": missing, "device": device, "backbone": backbone, "dataset": dataset,
            "checks": checks}
