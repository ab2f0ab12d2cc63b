"""Multi-process runs under ``torchrun``: the one place that reads the launcher's environment and talks to
``torch.distributed``.

- :func:`launched`: rank/world/local rank as ``torchrun`` set them (environment only; no torch import), for code that
  must decide before or without joining the process group (``qpm extract`` printing only on rank 0);
- :func:`init_distributed`: join the process group when launched with more than one process (gloo on CPU, nccl with
  CUDA, each rank on ``cuda:LOCAL_RANK``) and return :class:`DistInfo`; :func:`dist_info`: the current state;
- :meth:`DistInfo.barrier`, :meth:`DistInfo.broadcast` (a picklable object from rank 0; internal values only),
  :func:`all_reduce` (sum over ranks, optionally differentiable), :func:`world_size`;
- :func:`local_device`: the device a rank uses (``cuda`` becomes ``cuda:LOCAL_RANK`` under ``torchrun``).

Outside ``torchrun`` everything is a no-op for a single process (rank 0 of 1). torch is imported inside functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = ["DistInfo", "all_reduce", "barrier", "broadcast", "dist_info", "init_distributed",
           "launched", "local_device", "world_size"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a run: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes run files and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process)."""
        if self.world > 1:
            barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (no-op for one process)."""
        return obj if self.world == 1 else broadcast(obj)


def launched() -> DistInfo:
    """Rank, world size and local rank from the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                    int(os.environ.get("LOCAL_RANK", "0")))


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def dist_info() -> DistInfo:
    """The torch.distributed rank/world size, or (0, 1) outside ``torchrun``."""
    if _initialized():
        import torch.distributed as dist

        return DistInfo(dist.get_rank(), dist.get_world_size(), launched().local_rank)
    return DistInfo()


def world_size() -> int:
    """Number of processes in the initialised process group (1 without one)."""
    if _initialized():
        import torch.distributed as dist

        return dist.get_world_size()
    return 1


def init_distributed() -> DistInfo:
    """Join the process group when launched by ``torchrun`` with more than one process (gloo on CPU, nccl on CUDA,
    where each rank first selects ``cuda:LOCAL_RANK``); idempotent. Returns :func:`dist_info`."""
    env = launched()
    if env.world > 1 and not _initialized():
        import torch
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend)
    return dist_info()


def barrier() -> None:
    """Wait for every rank of the initialised process group (no-op without one)."""
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``broadcast_object_list``; for values this process made, never user files)."""
    if not _initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(tensor: Any, *, differentiable: bool = False) -> Any:
    """Sum ``tensor`` over ranks. In place and returned (plain), or a new tensor that gradients flow through
    (``differentiable=True``, used by the synchronised BatchNorm). Without a process group: ``tensor``."""
    if not _initialized():
        return tensor
    if differentiable:
        import warnings

        import torch.distributed.nn.functional as dnn

        with warnings.catch_warnings():  # the differentiable all_reduce is flagged deprecated; its successor: no grad
            warnings.simplefilter("ignore", FutureWarning)
            return dnn.all_reduce(tensor)
    import torch.distributed as dist

    dist.all_reduce(tensor)
    return tensor


def local_device(device: str) -> str:
    """The device this rank uses: ``cuda``/``cuda:N`` becomes ``cuda:LOCAL_RANK`` under ``torchrun`` with more than one
    process; anything else is returned unchanged."""
    env = launched()
    if env.world > 1 and str(device).startswith("cuda"):
        return f"cuda:{env.local_rank}"
    return device
