"""The training loop on cached tokens (METHOD.md §5): one phase of schedule-free AdamW, its checkpoints, and the
BatchNorm recompute; used by :mod:`qpmcli.train` for the dense and finetune phases.

What we do beyond the reference (METHOD.md §12 item 8):
- after the schedule-free eval swap the BatchNorm running statistics are recomputed with the evaluated (x) weights over
  the train set (``recompute_bn=True``, switchable), so eval-mode outputs match the weights that are saved;
- every RNG is seeded explicitly; shuffling uses a generator derived from (seed, phase, epoch), so a run resumed from a
  checkpoint (model + optimizer + RNG state, safetensors + JSON, file names from :mod:`qpmcli.artifact`) continues
  exactly where it stopped;
- the token cache is held in device memory when it fits, else batches are gathered from the memory map
  (:class:`TokenData`);
- ``torchrun`` + DDP splits every global batch over the ranks (global batch size constant, BatchNorm statistics
  synchronised), so N processes compute what one process computes.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpmcli import artifact
from qpmcli.distributed import DistInfo, dist_info
from qpmcli.errors import ConfigError, DatasetError
from qpmcli.losses import DENSE_WEIGHTS, FINETUNE_WEIGHTS, LossWeights

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qpmcli.model import QPMModel


# ------------------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class PhaseOptions:
    """Hyper-parameters of one training phase (defaults: METHOD.md §3.6 qpm/dinov2)."""

    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    losses: LossWeights
    recompute_bn: bool = True  # recompute BN running stats with the eval (x) weights after training
    bf16: bool = False  # bf16 autocast for the forward pass (CUDA; CPU works but is slow)
    eval_every: int = 0  # test accuracy every N epochs (and at the last) when test data is given; 0 = only the last
    checkpoint_seconds: float = 60.0  # mid-epoch checkpoint interval
    checkpoint_steps: int = 0  # additionally checkpoint every N steps (0 = off)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhaseOptions:
        d = dict(d)
        d["losses"] = LossWeights(**d["losses"])
        return cls(**d)


DENSE_PHASE = PhaseOptions(epochs=25, lr=1e-3, weight_decay=7e-4, batch_size=32, losses=DENSE_WEIGHTS)
FINETUNE_PHASE = PhaseOptions(epochs=25, lr=5e-3, weight_decay=8e-4, batch_size=16, losses=FINETUNE_WEIGHTS)
LINEAR_PROBE_PHASE = PhaseOptions(epochs=40, lr=1e-3, weight_decay=7e-4, batch_size=32, losses=LossWeights())
# The paper's baselines (METHOD.md §3.6 sldd/dinov2, qsenn/dinov2): dense 40 epochs and FDL 0.196 in both phases, no
# L1 losses; SLDD finetunes 50 epochs, Q-SENN 25 per iteration (its selector's schedule then sets epochs and lr).
BASELINE_DENSE_PHASE = replace(DENSE_PHASE, epochs=40, losses=LossWeights(fdl=0.196))
BASELINE_FINETUNE_PHASES = {
    "sldd": replace(FINETUNE_PHASE, epochs=50, losses=LossWeights(fdl=0.196)),
    "qsenn": replace(FINETUNE_PHASE, epochs=25, losses=LossWeights(fdl=0.196)),
}


def phase_presets(head: str, selector: str) -> tuple[PhaseOptions, PhaseOptions]:
    """The (dense, finetune) defaults of the paper's table row for ``head`` and ``selector``."""
    if head == "linear-probe":
        return LINEAR_PROBE_PHASE, FINETUNE_PHASE
    if selector in BASELINE_FINETUNE_PHASES:
        return BASELINE_DENSE_PHASE, BASELINE_FINETUNE_PHASES[selector]
    return DENSE_PHASE, FINETUNE_PHASE


# ----------------------------------------------------------------------------------------------------- token data
class TokenData:
    """Tokens ``[N, T, D]`` (fp16 memmap or array) and labels ``[N]``, served as float32 batches on ``device``.

    ``hold="auto"`` copies the whole array to the device when it fits (GPU: under 70 % of free memory; CPU: under
    half the available RAM); otherwise each batch is gathered from the memory map and moved on its own. ``rows``
    (sorted cache row indices) serves only those rows, in that order: a calibration split held out of training
    (``qpm train --cal-fraction``) is skipped this way without copying the memory map.
    """

    def __init__(self, tokens: Any, labels: Any, device: str = "cpu", hold: str | bool = "auto",
                 rows: Any = None) -> None:
        import numpy as np
        import torch

        self.device = torch.device(device)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        labels = np.asarray(labels)
        if len(tokens) != len(labels):
            raise DatasetError(f"tokens ({len(tokens)}) and labels ({len(labels)}) differ in length")
        if self.rows is not None:
            labels = labels[self.rows]
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.n = int(self.labels.numel())
        self.shape = (self.n, *tuple(tokens.shape)[1:])
        nbytes = int(np.prod(self.shape)) * (tokens.element_size() if torch.is_tensor(tokens) else
                                              np.dtype(tokens.dtype).itemsize)
        self.held = self._fits(nbytes) if hold == "auto" else bool(hold)
        if self.held:
            self.tokens = self._to_device(tokens)
        else:
            self.tokens = tokens
        self.labels_dev = self.labels.to(self.device)

    def _fits(self, nbytes: int) -> bool:
        import torch

        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return nbytes < 0.7 * free
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return False
        return nbytes < 0.5 * avail

    def _to_device(self, tokens: Any) -> torch.Tensor:
        """Copy in chunks so a memmap never needs a second full copy in host memory."""
        import numpy as np
        import torch

        if torch.is_tensor(tokens):
            return (tokens if self.rows is None else tokens[torch.from_numpy(self.rows)]).to(self.device)
        out = torch.empty(self.shape, dtype=torch.from_numpy(np.zeros(0, tokens.dtype)).dtype, device=self.device)
        step = max(1, (256 << 20) // max(1, int(np.prod(self.shape[1:])) * tokens.dtype.itemsize))
        for i in range(0, self.n, step):
            part = tokens[i:i + step] if self.rows is None else tokens[self.rows[i:i + step]]
            out[i:i + step] = torch.from_numpy(np.array(part)).to(self.device)
        return out

    def __len__(self) -> int:
        return self.n

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np
        import torch

        if self.held:
            x = self.tokens.index_select(0, idx.to(self.device))
        else:
            ids = idx.cpu().numpy()
            if self.rows is not None:
                ids = self.rows[ids]
            order = np.argsort(ids, kind="stable")  # sorted reads are sequential on disk
            chunk = np.asarray(self.tokens[ids[order]])
            inv = np.empty_like(order)
            inv[order] = np.arange(len(order))
            x = torch.from_numpy(chunk[inv])
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device, torch.float32), self.labels_dev.index_select(0, idx.to(self.device))


def _phase_seed(seed: int, phase: str, offset: int) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(phase.encode()) * 7_919 + offset) % 2**63


def _epoch_batches(n: int, batch_size: int, seed: int, phase: str, epoch: int, shuffle: bool = True) -> list:
    """The global batches of one epoch: a permutation from a generator seeded by (seed, phase, epoch); no drop_last."""
    import torch

    if shuffle:
        g = torch.Generator().manual_seed(_phase_seed(seed, phase, epoch))
        perm = torch.randperm(n, generator=g)
    else:
        perm = torch.arange(n)
    return list(perm.split(batch_size))


def _local(batch: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    if dist.world == 1:
        return batch
    return batch.tensor_split(dist.world)[dist.rank]


# ------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(ckpt_dir: Path, phase: str, model: QPMModel, optimizer: Any, state: dict[str, Any]) -> None:
    """Model + optimizer tensors as safetensors, the rest (step, RNG, param groups) as JSON; JSON written last."""
    import torch

    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    osd = optimizer.state_dict()
    for pid, pstate in osd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    scalars = {str(pid): {k: v for k, v in ps.items() if not torch.is_tensor(v)} for pid, ps in osd["state"].items()}
    json_path = ckpt_dir / artifact.checkpoint_json(phase)
    data_path = ckpt_dir / artifact.checkpoint_data(phase, state["epoch"], state["step"])
    artifact.atomic_write_safetensors(data_path, tensors)
    old = artifact.read_json(json_path).get("data") if json_path.is_file() else None
    artifact.atomic_write_json(json_path, {**state, "data": data_path.name, "param_groups": osd["param_groups"],
                                           "optim_scalars": scalars})
    if old and old != data_path.name and (ckpt_dir / old).exists():
        (ckpt_dir / old).unlink()


def load_checkpoint(ckpt_dir: Path, phase: str, model: QPMModel, optimizer: Any) -> dict[str, Any] | None:
    """Restore model, optimizer and RNG state from the phase checkpoint; returns its JSON state or None."""
    import torch

    json_path = ckpt_dir / artifact.checkpoint_json(phase)
    if not json_path.is_file():
        return None
    state = artifact.read_json(json_path)
    from qpmcli.modelfile import confined

    tensors = artifact.read_safetensors(confined(ckpt_dir, state.get("data"), f"{json_path} 'data'"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    device = next(iter(model.state_dict().values())).device
    opt_state: dict[int, dict[str, Any]] = {}
    for pid, scalars in state["optim_scalars"].items():
        opt_state[int(pid)] = dict(scalars)
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value.to(device)
    groups = state["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


def checkpoint_epoch(ckpt_dir: Path, phase: str) -> int:
    """Completed epochs stored in the phase checkpoint (0 without one): log rows after it will be written again."""
    json_path = ckpt_dir / artifact.checkpoint_json(phase)
    return int(artifact.read_json(json_path)["epoch"]) if json_path.is_file() else 0


def clear_checkpoint(ckpt_dir: Path, phase: str) -> None:
    """Remove a finished phase's checkpoint (its JSON and the tensor files it wrote)."""
    for p in ckpt_dir.glob(f"{phase}-*-*.safetensors"):
        if artifact.is_checkpoint_data(p.name, phase):
            p.unlink()
    (ckpt_dir / artifact.checkpoint_json(phase)).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------- helpers
def _autocast(device: torch.device, enabled: bool):
    import torch

    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _bn_layers(model: torch.nn.Module) -> list:
    import torch

    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def recompute_bn_stats(model: QPMModel, data: TokenData, batch_size: int, bf16: bool = False,
                       dist: DistInfo | None = None) -> None:
    """Reset BN running statistics and re-estimate them (cumulative average over one ordered pass of the train set)
    with the model's current weights; called after the schedule-free swap to the evaluated (x) weights."""
    import torch

    bns = _bn_layers(model)
    if not bns:
        return
    dist = dist or DistInfo()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for batch in _epoch_batches(data.n, batch_size, 0, "bn", 0, shuffle=False):
            local = _local(batch, dist)
            x, _ = data.batch(local)
            with _autocast(data.device, bf16):
                model.mlp(x)
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    model.eval()


def collect_token_outputs(model: QPMModel, data: TokenData, batch_size: int = 256, bf16: bool = False,
                          ) -> dict[str, torch.Tensor]:
    """Eval-mode pass in data order: pooled features ``[N, K]`` (float32, CPU), logits ``[N, C]``, labels ``[N]``."""
    import torch

    model.eval()
    feats, logits = [], []
    with torch.no_grad():
        for batch in _epoch_batches(data.n, batch_size, 0, "eval", 0, shuffle=False):
            x, _ = data.batch(batch)
            with _autocast(data.device, bf16):
                out = model(x)
            feats.append(out.features.float().cpu())
            logits.append(out.logits.float().cpu())
    return {"features": torch.cat(feats), "logits": torch.cat(logits), "labels": data.labels.clone()}


def collect_pooled(model: QPMModel, data: TokenData, batch_size: int = 256, bf16: bool = False) -> torch.Tensor:
    """Eval-mode pooled features of all ``n_f`` adapter outputs ``[N, n_f]`` (before any selection), in data order."""
    import torch

    model.eval()
    feats = []
    with torch.no_grad():
        for batch in _epoch_batches(data.n, batch_size, 0, "eval", 0, shuffle=False):
            x, _ = data.batch(batch)
            with _autocast(data.device, bf16):
                feats.append(model.adapt(x)[1].float().cpu())
    return torch.cat(feats)


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std of each feature over all train samples (float64 accumulation; METHOD.md §5.2)."""
    f = features.double()
    return f.mean(0).float(), f.std(0, unbiased=False).float()


def _accuracy(model: QPMModel, data: TokenData, batch_size: int, bf16: bool) -> float:
    out = collect_token_outputs(model, data, batch_size, bf16)
    return float((out["logits"].argmax(1) == out["labels"]).float().mean())


# ---------------------------------------------------------------------------------------------------- the loop
@dataclass
class PhaseResult:
    phase: str
    epochs: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    resumed_from: str | None = None


def train_phase(model: QPMModel, data: TokenData, opts: PhaseOptions, *, phase: str, seed: int,
                test_data: TokenData | None = None, checkpoint_dir: str | os.PathLike[str] | None = None,
                on_epoch: Callable[[dict[str, Any]], None] | None = None, progress: bool = True,
                on_step: Callable[[int], None] | None = None) -> PhaseResult:
    """Train ``model`` (its trainable parameters) for one phase with schedule-free AdamW; ends in eval mode with the
    averaged (x) weights and, if ``opts.recompute_bn``, BN statistics recomputed for them.

    With ``checkpoint_dir`` the phase checkpoints every ``opts.checkpoint_seconds`` (and every
    ``opts.checkpoint_steps`` steps) and at each epoch end, and resumes from an existing checkpoint.

    ``on_step(steps_done)`` is called after every optimizer step, once the checkpoint due at that step (mid-epoch, or
    the epoch-end one after an epoch's last step) is written. An exception raised by it leaves the phase exactly as a
    kill at that moment would (tests interrupt a phase this way and resume it).
    """
    import schedulefree
    import torch

    dist = dist_info()
    device = data.device
    params = model.trainable_parameters()
    if not params:
        raise ConfigError(f"{phase}: the model has no trainable parameters")
    if opts.batch_size < dist.world:
        raise ConfigError(f"batch size {opts.batch_size} is smaller than the number of processes {dist.world}")
    optimizer = schedulefree.AdamWScheduleFree(params, lr=opts.lr, weight_decay=opts.weight_decay)
    net: torch.nn.Module = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start_epoch, start_step, acc_state = 0, 0, None
    result = PhaseResult(phase, opts.epochs)
    # dropout draws from the global torch RNG: seed it per phase so a phase is reproducible on its own
    torch.manual_seed(_phase_seed(seed, phase, 10**6))
    if ckpt_dir is not None:
        state = load_checkpoint(ckpt_dir, phase, model, optimizer)
        if state is not None:
            start_epoch, start_step, acc_state = state["epoch"], state["step"], state["accum"]
            result.history = state.get("history", [])
            result.resumed_from = f"epoch {start_epoch} step {start_step}"
    tokens_per_item = data.shape[1]
    t_phase = time.perf_counter()
    items_seen = 0
    last_ckpt = time.monotonic()
    steps_done = 0
    bar = EpochBar(progress and dist.is_main, f"{phase}", opts.epochs)
    try:
        for epoch in range(start_epoch, opts.epochs):
            optimizer.train()
            model.train()
            batches = _epoch_batches(data.n, opts.batch_size, seed, phase, epoch)
            if acc_state is not None and epoch == start_epoch:
                sums = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in acc_state.items()}
            else:
                sums = {}
            t_epoch = time.perf_counter()
            bar.start_epoch(epoch, len(batches), completed=start_step if epoch == start_epoch else 0)
            for step in range(start_step if epoch == start_epoch else 0, len(batches)):
                gbatch = batches[step]
                local = _local(gbatch, dist)
                x, y = data.batch(local)
                with _autocast(device, opts.bf16):
                    out = net(x)
                from qpmcli.losses import total_loss

                loss, parts = total_loss(out.logits.float(), out.maps.float(), out.features.float(), y,
                                         model.head_weight(), opts.losses)
                scale = len(local) * dist.world / len(gbatch)  # DDP averages; this makes it a global-batch mean
                optimizer.zero_grad(set_to_none=True)
                (loss * scale).backward()
                optimizer.step()
                n_local = float(len(local))
                with torch.no_grad():
                    upd = {"loss": loss.detach() * n_local, "correct": (out.logits.argmax(1) == y).sum(),
                           "count": torch.tensor(n_local, device=device)}
                    upd.update({k: v * n_local for k, v in parts.items()})
                    for k, v in upd.items():
                        sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=device)) + v.double()
                items_seen += len(gbatch)
                steps_done += 1
                bar.advance(float(loss.detach()) if step % 10 == 0 else None)
                last_step_of_epoch = step + 1 == len(batches)
                want = (time.monotonic() - last_ckpt > opts.checkpoint_seconds
                        or (opts.checkpoint_steps and steps_done % opts.checkpoint_steps == 0))
                if ckpt_dir is not None and want and not last_step_of_epoch and dist.is_main:
                    save_checkpoint(ckpt_dir, phase, model, optimizer,
                                    {"epoch": epoch, "step": step + 1, "phase": phase, "history": result.history,
                                     "accum": {k: float(v) for k, v in sums.items()}})
                    last_ckpt = time.monotonic()
                if on_step is not None and not last_step_of_epoch:
                    on_step(steps_done)
            totals = _all_reduce_sums(sums, dist)
            count = max(totals.pop("count"), 1.0)
            record: dict[str, Any] = {"phase": phase, "epoch": epoch + 1, "loss": totals.pop("loss") / count,
                                      "train_acc": totals.pop("correct") / count,
                                      **{k: v / count for k, v in totals.items()},
                                      "seconds": round(time.perf_counter() - t_epoch, 3), "lr": opts.lr}
            last_epoch = epoch + 1 == opts.epochs
            if test_data is not None and (last_epoch or (opts.eval_every and (epoch + 1) % opts.eval_every == 0)):
                optimizer.eval()
                if opts.recompute_bn:
                    recompute_bn_stats(model, data, opts.batch_size, opts.bf16, dist)
                record["test_acc"] = _accuracy(model, test_data, 256, opts.bf16)
                if not last_epoch:
                    optimizer.train()
            result.history.append(record)
            bar.end_epoch(record)
            if on_epoch is not None and dist.is_main:
                on_epoch(record)
            if ckpt_dir is not None and dist.is_main and not last_epoch:
                save_checkpoint(ckpt_dir, phase, model, optimizer,
                                {"epoch": epoch + 1, "step": 0, "phase": phase, "history": result.history,
                                 "accum": None})
                last_ckpt = time.monotonic()
            if on_step is not None:
                on_step(steps_done)
            start_step = 0
    finally:
        bar.close()
    optimizer.eval()  # params := the averaged x weights
    if opts.recompute_bn:
        recompute_bn_stats(model, data, opts.batch_size, opts.bf16, dist)
    model.eval()
    result.seconds = time.perf_counter() - t_phase
    result.tokens_per_second = items_seen * tokens_per_item / max(result.seconds, 1e-9)
    return result


def _all_reduce_sums(sums: dict[str, torch.Tensor], dist: DistInfo) -> dict[str, float]:
    import torch

    if dist.world > 1:
        from qpmcli.distributed import all_reduce

        keys = sorted(sums)
        vec = all_reduce(torch.stack([sums[k] for k in keys]))
        return {k: float(v) for k, v in zip(keys, vec, strict=True)}
    return {k: float(v) for k, v in sums.items()}


class EpochBar:
    """A progress bar per epoch showing the running loss (:func:`qpmcli.progress.progress_bar`); silent when
    disabled."""

    def __init__(self, enabled: bool, phase: str, epochs: int) -> None:
        self.enabled = enabled
        self.phase, self.epochs = phase, epochs
        self._p = None
        self._task = None
        if enabled:
            from qpmcli.progress import progress_bar

            self._p = progress_bar(transient=False, info=True)
            self._p.start()

    def start_epoch(self, epoch: int, total: int, completed: int = 0) -> None:
        if self._p is not None:
            self._task = self._p.add_task(f"{self.phase} {epoch + 1}/{self.epochs}", total=total,
                                          completed=completed, info="")

    def advance(self, loss: float | None) -> None:
        if self._p is not None and self._task is not None:
            if loss is not None:
                self._p.update(self._task, advance=1, info=f"loss {loss:.4f}")
            else:
                self._p.advance(self._task)

    def end_epoch(self, record: dict[str, Any]) -> None:
        if self._p is not None and self._task is not None:
            info = f"loss {record['loss']:.4f} acc {record['train_acc']:.3f}"
            if "test_acc" in record:
                info += f" test {record['test_acc']:.3f}"
            self._p.update(self._task, info=info)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None
