"""Devices, in one place: the device grammar, the checks made before any work, what ``auto`` means for PyTorch, and
the ONNX Runtime execution providers of a device.

A device string is ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or (ONNX Runtime only) ``tensorrt``. Every command checks
its device with :func:`check_device` before any work; PyTorch code asks :func:`torch_device` for the concrete device,
ONNX Runtime code asks :func:`ort_providers`. Nothing here imports torch unless CUDA was asked for, so the checks
cost nothing on CPU machines and torch-free commands stay torch-free.
"""

from __future__ import annotations

import re
from typing import Any

from qpmcli.errors import ConfigError

__all__ = ["DEVICES", "ORT_DEVICES", "check_device", "cuda_device_count", "is_device", "ort_providers",
           "torch_device"]

DEVICES = ("auto", "cpu", "cuda", "cuda:0")  # what shell completion offers (cuda:N for any N is accepted)
ORT_DEVICES = (*DEVICES, "tensorrt")
_PATTERN = r"auto|cpu|cuda(:\d+)?"


def is_device(value: str, *, tensorrt: bool = False) -> bool:
    """Whether ``value`` is a device string (``tensorrt`` only where ONNX Runtime runs the model)."""
    return re.fullmatch(_PATTERN + ("|tensorrt" if tensorrt else ""), value) is not None


def cuda_device_count() -> int:
    """Number of CUDA devices, asked from the driver (libcuda) so that no torch import is needed."""
    import ctypes

    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    return 0


def check_device(device: str | None, *, tensorrt: bool = False, torch: bool = False, flag: str = "--device"
                 ) -> str:
    """Validate a device string (the flag's, else the setting's) before any work; returns it.

    ``cuda``/``cuda:N``/``tensorrt`` without a visible CUDA device is one clear error. ``torch``: the command runs
    PyTorch on it, so a CPU-only PyTorch build is also an error (torch is imported only when CUDA was asked for).
    ``flag`` names where the value came from in the message.
    """
    device = (device or "auto").strip()
    if not is_device(device, tensorrt=tensorrt):
        choices = "auto, cpu, cuda, cuda:N" + (", tensorrt" if tensorrt else "")
        raise ConfigError(f"{flag} {device!r} is not a device; use one of {choices}")
    if device.startswith("cuda") or device == "tensorrt":
        n = cuda_device_count()
        if n == 0:
            raise ConfigError(f"{flag} {device}: no CUDA device is visible on this machine; use --device cpu "
                              f"(or auto)")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= n:
            raise ConfigError(f"{flag} {device}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})")
        if torch:
            import torch as _torch

            if not _torch.cuda.is_available():
                raise ConfigError(f"{flag} {device}: this PyTorch build ({_torch.__version__}) has no CUDA support; "
                                  f"install a CUDA build of torch or use --device cpu")
    return device


def torch_device(device: str | None) -> str:
    """The concrete PyTorch device of a checked device string: ``auto`` (and ``tensorrt``, whose PyTorch side runs on
    CUDA) is ``cuda`` when PyTorch sees a GPU, else ``cpu``; anything else is itself."""
    device = device or "auto"
    if device in ("auto", "tensorrt"):
        if cuda_device_count() == 0:
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def ort_providers(device: str) -> tuple[list[Any], bool]:
    """ONNX Runtime execution providers to request for a checked ``device``, and whether to bind inputs and outputs
    on the GPU (IO binding). ``auto`` takes CUDA when ONNX Runtime has it and a GPU is visible."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"], False
    gpus = cuda_device_count()
    if device == "tensorrt":
        if "TensorrtExecutionProvider" not in available or gpus == 0:
            raise ConfigError("device tensorrt needs onnxruntime-gpu with the TensorRT EP and a CUDA GPU")
        return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], True
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available or gpus == 0:
            raise ConfigError(f"device {device} needs onnxruntime-gpu and a CUDA GPU; use --device cpu")
        dev_id = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": dev_id}), "CPUExecutionProvider"], True
    if "CUDAExecutionProvider" in available and gpus > 0:  # auto
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], True
    return ["CPUExecutionProvider"], False
