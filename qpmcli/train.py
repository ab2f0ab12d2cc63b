"""Training: the dense and finetune loops on cached tokens (METHOD.md §5) and ``train_run`` = the whole ``qpm train``.

What we do beyond the reference (ARCHITECTURE.md §5, METHOD.md §12 item 8):
- after the schedule-free eval swap the BatchNorm running statistics are recomputed with the evaluated (x) weights over
  the train set (``recompute_bn=True``, switchable), so eval-mode outputs match the weights that are saved;
- every RNG is seeded explicitly; shuffling uses a generator derived from (seed, phase, epoch), so a run resumed from a
  checkpoint (model + optimizer + RNG state, safetensors + JSON) continues exactly where it stopped;
- the token cache is held in device memory when it fits, else batches are gathered from the memory map;
- ``torchrun`` + DDP splits every global batch over the ranks (global batch size constant, BatchNorm statistics
  synchronised), so N processes compute what one process computes.
"""

from __future__ import annotations

import contextlib
import csv
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpmcli import artifact
from qpmcli.distributed import DistInfo, barrier, dist_info, init_distributed, local_device
from qpmcli.errors import ArtifactError, ConfigError, DatasetError, QpmError
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
    half the available RAM); otherwise each batch is gathered from the memory map and moved on its own.
    """

    def __init__(self, tokens: Any, labels: Any, device: str = "cpu", hold: str | bool = "auto") -> None:
        import numpy as np
        import torch

        self.device = torch.device(device)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.n = int(self.labels.numel())
        if len(tokens) != self.n:
            raise DatasetError(f"tokens ({len(tokens)}) and labels ({self.n}) differ in length")
        self.shape = tuple(tokens.shape)
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
            return tokens.to(self.device)
        out = torch.empty(self.shape, dtype=torch.from_numpy(np.zeros(0, tokens.dtype)).dtype, device=self.device)
        step = max(1, (256 << 20) // max(1, int(np.prod(self.shape[1:])) * tokens.dtype.itemsize))
        for i in range(0, self.n, step):
            out[i:i + step] = torch.from_numpy(np.array(tokens[i:i + step])).to(self.device)
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
def _checkpoint_paths(ckpt_dir: Path, phase: str) -> tuple[Path, Path]:
    return ckpt_dir / f"{phase}.safetensors", ckpt_dir / f"{phase}.json"


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
    weights_path, json_path = _checkpoint_paths(ckpt_dir, phase)
    tag = f"{state['epoch']}-{state['step']}"
    data_path = weights_path.with_name(f"{phase}-{tag}.safetensors")
    artifact.atomic_write_safetensors(data_path, tensors)
    old = artifact.read_json(json_path).get("data") if json_path.is_file() else None
    artifact.atomic_write_json(json_path, {**state, "data": data_path.name, "param_groups": osd["param_groups"],
                                           "optim_scalars": scalars})
    if old and old != data_path.name and (ckpt_dir / old).exists():
        (ckpt_dir / old).unlink()


def load_checkpoint(ckpt_dir: Path, phase: str, model: QPMModel, optimizer: Any) -> dict[str, Any] | None:
    """Restore model, optimizer and RNG state from the phase checkpoint; returns its JSON state or None."""
    import torch

    _, json_path = _checkpoint_paths(ckpt_dir, phase)
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
    _, json_path = _checkpoint_paths(ckpt_dir, phase)
    return int(artifact.read_json(json_path)["epoch"]) if json_path.is_file() else 0


def clear_checkpoint(ckpt_dir: Path, phase: str) -> None:
    """Remove a finished phase's checkpoint (its JSON and the tensor files it wrote)."""
    _, json_path = _checkpoint_paths(ckpt_dir, phase)
    for p in ckpt_dir.glob(f"{phase}-*-*.safetensors"):
        parts = p.name[len(phase) + 1:-len(".safetensors")].split("-")  # "<epoch>-<step>"
        if len(parts) == 2 and all(x.isdigit() for x in parts):
            p.unlink()
    json_path.unlink(missing_ok=True)


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


def collect_outputs(model: QPMModel, data: TokenData, batch_size: int = 256, bf16: bool = False,
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
    out = collect_outputs(model, data, batch_size, bf16)
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
                stop_after_steps: int | None = None) -> PhaseResult:
    """Train ``model`` (its trainable parameters) for one phase with schedule-free AdamW; ends in eval mode with the
    averaged (x) weights and, if ``opts.recompute_bn``, BN statistics recomputed for them.

    With ``checkpoint_dir`` the phase checkpoints every ``opts.checkpoint_seconds`` and at each epoch end and resumes
    from an existing checkpoint. ``stop_after_steps`` ends early (after a checkpoint) and raises ``KeyboardInterrupt``
    -- used to test resumption exactly like a kill would.
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
    bar = _Progress(progress and dist.is_main, f"{phase}", opts.epochs)
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
                        or (opts.checkpoint_steps and steps_done % opts.checkpoint_steps == 0)
                        or (stop_after_steps is not None and steps_done >= stop_after_steps))
                if ckpt_dir is not None and want and not last_step_of_epoch and dist.is_main:
                    save_checkpoint(ckpt_dir, phase, model, optimizer,
                                    {"epoch": epoch, "step": step + 1, "phase": phase, "history": result.history,
                                     "accum": {k: float(v) for k, v in sums.items()}})
                    last_ckpt = time.monotonic()
                if stop_after_steps is not None and steps_done >= stop_after_steps and not last_step_of_epoch:
                    raise KeyboardInterrupt(f"{phase}: stopped after {steps_done} steps (checkpoint saved)")
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
            if (stop_after_steps is not None and steps_done >= stop_after_steps and not last_epoch):
                raise KeyboardInterrupt(f"{phase}: stopped after {steps_done} steps (checkpoint saved)")
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


class _Progress:
    """A rich progress bar per epoch showing the running loss; silent when disabled."""

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


# ------------------------------------------------------------------------------------------------ the pipeline
HEADS = ("qpm", "linear-probe")


@dataclass
class TrainRequest:
    """Everything ``qpm train`` needs; saved (resolved) as ``config.json`` of the run."""

    backbone: str = "dinov2-vitb14-reg"
    dataset: str = "cub200"
    data_root: str | None = None
    weights: str | None = None
    preprocess: str = "official"
    dataset_options: dict[str, Any] = field(default_factory=dict)
    backbone_options: dict[str, Any] = field(default_factory=dict)
    selector: str = "qpm"
    n_selected: int = 50
    per_class: int = 5
    time_limit: float = 60.0
    workers: int = 8
    head: str = "qpm"
    n_layers: int = 4
    hidden_size: int = 2048
    n_features: int = 512
    activation: str = "relu"
    pooling: str = "avg"
    dense: PhaseOptions = DENSE_PHASE
    finetune: PhaseOptions = FINETUNE_PHASE
    seed: int = 383534468
    metrics: str = "all"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dense"] = self.dense.to_dict()
        d["finetune"] = self.finetune.to_dict()
        return d


def _validate_request(req: TrainRequest) -> None:
    """Name and size errors that need no data, raised before any work starts."""
    from qpmcli.model import ACTIVATIONS, MAX_FEATURES, POOLINGS
    from qpmcli.registry import get_registry

    reg = get_registry()
    reg.get("backbone", req.backbone)
    reg.get("dataset", req.dataset)
    if req.head not in HEADS:
        raise ConfigError(f"unknown head {req.head!r}; choose one of {', '.join(HEADS)}")
    if req.head == "qpm":
        reg.get("selector", req.selector)
        if req.per_class < 1 or req.n_selected < 1:
            raise ConfigError(f"--features ({req.n_selected}) and --per-class ({req.per_class}) must be at least 1")
        if req.per_class > req.n_selected:
            raise ConfigError(f"--per-class {req.per_class} exceeds --features {req.n_selected}")
        if req.n_layers > 0 and req.n_selected > req.n_features:
            raise ConfigError(f"--features {req.n_selected} exceeds the adapter's {req.n_features} dense features "
                              f"(--dense-features)")
    if req.n_layers > 0 and not 1 <= req.n_features <= MAX_FEATURES:
        raise ConfigError(f"--dense-features {req.n_features} cannot be trained (allowed 1..{MAX_FEATURES})")
    if req.pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {req.pooling!r}; choose one of {', '.join(POOLINGS)}")
    if req.activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {req.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    for name, ph in (("dense", req.dense), ("finetune", req.finetune)):
        if ph.epochs < 1 or ph.batch_size < 1 or ph.lr <= 0:
            raise ConfigError(f"{name} phase needs epochs >= 1, batch size >= 1 and lr > 0 "
                              f"(got {ph.epochs}, {ph.batch_size}, {ph.lr})")
    if req.time_limit <= 0:
        raise ConfigError(f"--time-limit must be positive, got {req.time_limit}")


def default_run_dir(settings: Any, req: TrainRequest) -> Path:
    import re

    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{req.dataset}-{req.backbone}")
    return Path(settings.runs_dir) / label


def _check_classes(labels: Any, class_names: list[str], split: str) -> None:
    import numpy as np

    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    empty = np.flatnonzero(counts == 0)
    if split == "train" and len(empty):
        names = ", ".join(str(class_names[i]) for i in empty[:5])
        more = ", ..." if len(empty) > 5 else ""
        raise DatasetError(f"{len(empty)} class(es) have no training images ({names}{more})"
                           f"; every class needs at least one")
    if len(counts) > len(class_names):
        raise DatasetError(f"{split} labels go up to {len(counts) - 1} but the dataset has {len(class_names)} classes")


class _RunLog:
    """log.jsonl + log.csv (one row per epoch of every phase), rewritten atomically from the JSONL each time."""

    def __init__(self, run_dir: Path) -> None:
        self.jsonl = run_dir / artifact.LOG_JSONL
        self.csv = run_dir / artifact.LOG_CSV

    def drop_phase(self, phase: str, keep_epochs: int = 0) -> None:
        rows = [r for r in artifact.read_jsonl(self.jsonl) if r.get("phase") != phase or r["epoch"] <= keep_epochs]
        artifact.atomic_write_text(self.jsonl, "".join(artifact.to_json(r).replace("\n", "") + "\n" for r in rows))
        self._write_csv(rows)

    def __call__(self, record: dict[str, Any]) -> None:
        artifact.append_jsonl(self.jsonl, record)
        self._write_csv(artifact.read_jsonl(self.jsonl))

    def _write_csv(self, rows: list[dict[str, Any]]) -> None:
        import io

        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
        artifact.atomic_write_text(self.csv, buf.getvalue())


def _evaluate(model: QPMModel, train_cache: Any, test_cache: Any, req: TrainRequest, device: str,
              settings: Any) -> dict[str, Any]:
    """The metrics of METHOD.md §8 (``req.metrics``) on the run's caches, with the dataset's attributes if any."""
    from qpmcli.evaluate import checked_metric_names, dataset_attributes, evaluate_model

    keys = checked_metric_names(req.metrics)
    class_attrs = image_attrs = None
    if {"Structural-Grounding", "Alignment"} & set(keys):
        class_attrs, image_attrs, _ = dataset_attributes(req.dataset, settings, data_root=req.data_root,
                                                         dataset_options=req.dataset_options,
                                                         train_cache=train_cache, n_classes=model.n_classes)
    return evaluate_model(model, train_cache, test_cache, class_attributes=class_attrs, image_attributes=image_attrs,
                          which=keys, seed=req.seed, device=device, progress=False)


def train_run(req: TrainRequest, settings: Any, *, run_dir: str | os.PathLike[str] | None = None,
              resume: bool = False, progress: bool = True, backbone_obj: Any = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``qpm train``: extract (when the caches are missing) -> dense -> select -> finetune -> evaluate, in one run
    directory. Finished stages are skipped with ``resume``; an interrupted phase continues from its checkpoint.
    Returns a JSON-able summary (paths, metrics, selection facts, timings).
    """
    import random

    import numpy as np
    import torch

    say = log or (lambda _msg: None)
    _validate_request(req)
    dist = init_distributed()
    run = Path(run_dir) if run_dir is not None else default_run_dir(settings, req)
    cfg_path = run / artifact.CONFIG
    request_doc = req.to_dict()
    if cfg_path.is_file():
        if not resume:
            raise ArtifactError(f"run directory {run} already holds a run; pass --resume to continue it or choose "
                                f"another --run-dir")
        old = artifact.read_json(cfg_path).get("request", {})
        diffs = [k for k in request_doc if k not in ("time_limit", "workers", "metrics")
                 and _norm(old.get(k)) != _norm(request_doc[k])]
        if diffs:
            raise ArtifactError(f"run directory {run} was trained with other options ({', '.join(diffs)} differ); "
                                f"use another --run-dir")
    device = local_device(settings.torch_device())
    timings: dict[str, float] = {}

    # ---- extract
    t0 = time.perf_counter()
    if backbone_obj is None:
        from qpmcli.backbone import load_backbone

        opts = {"dataset": req.dataset, **req.backbone_options}
        backbone_obj = load_backbone(req.backbone, weights=req.weights, preprocess=req.preprocess,
                                     settings=settings, device=device if device.startswith("cuda") else None, **opts)
    from qpmcli.cache import ensure_cache

    caches = {}
    for split in ("train", "test"):  # collective under torchrun: every rank extracts a disjoint share
        caches[split] = ensure_cache(req.backbone, req.dataset, split, settings, data_root=req.data_root,
                                     dataset_options=req.dataset_options, progress=progress and dist.is_main,
                                     backbone_obj=backbone_obj, preprocess=req.preprocess)
    timings["extract"] = time.perf_counter() - t0
    train_cache, test_cache = caches["train"], caches["test"]
    manifest = train_cache.manifest
    key = manifest.get("key_fields", manifest)
    if key.get("backbone", backbone_obj.name) != backbone_obj.name:
        raise ArtifactError(f"the token cache {train_cache.path} holds {key.get('backbone')} tokens, not "
                            f"{backbone_obj.name}; delete it or use another cache_dir")
    class_names = [str(c) for c in (train_cache.classes or range(int(train_cache.labels.max()) + 1))]
    n_classes = len(class_names)
    _check_classes(train_cache.labels, class_names, "train")
    _check_classes(test_cache.labels, class_names, "test")
    embed_dim = int(train_cache.tokens.shape[-1])
    grid = train_cache.grid
    if req.head == "qpm":
        from qpmcli.selection import check_request

        n_f = embed_dim if req.n_layers == 0 else req.n_features
        check_request(n_f, n_classes, req.n_selected, req.per_class)
    info_base = {
        "class_names": class_names, "backbone": backbone_obj.name, "weights_digest": backbone_obj.weights_digest,
        "preprocess": backbone_obj.preprocess_config, "image_size": list(backbone_obj.image_size),
        "grid": list(grid), "embed_dim": embed_dim, "dataset": req.dataset, "head": req.head,
        "backbone_options": req.backbone_options, "seed": req.seed,
    }
    if dist.is_main:
        run.mkdir(parents=True, exist_ok=True)
        artifact.atomic_write_json(cfg_path, {"request": request_doc, "settings": settings.model_dump(mode="json"),
                                              "device": device, "world_size": dist.world,
                                              "caches": {"train": str(train_cache.path),
                                                         "test": str(test_cache.path)},
                                              "versions": artifact.library_versions()})
    barrier()
    run_log = _RunLog(run)
    ckpt_dir = run / artifact.CHECKPOINTS
    if dist.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    train_data = TokenData(train_cache.tokens, train_cache.labels, device)
    test_data = TokenData(test_cache.tokens, test_cache.labels, device)
    summary: dict[str, Any] = {"run_dir": str(run), "device": device, "world_size": dist.world,
                               "cache_on_device": train_data.held, "n_train": len(train_data),
                               "n_test": len(test_data), "n_classes": n_classes}

    def seed_all(offset: int) -> None:
        random.seed(req.seed + offset)
        np.random.seed((req.seed + offset) % 2**32)
        torch.manual_seed(req.seed + offset)

    # ---- dense
    from qpmcli.model import QPMModel, linear_probe_config

    if req.head == "linear-probe":
        model_cfg = linear_probe_config(embed_dim, n_classes, grid)
    else:
        model_cfg = dict(embed_dim=embed_dim, n_classes=n_classes, grid=list(grid), n_layers=req.n_layers,
                         hidden_size=req.hidden_size, n_features=req.n_features, activation=req.activation,
                         pooling=req.pooling, batch_norm=True, head_dropout=0.2)
    t0 = time.perf_counter()
    if resume and (run / artifact.DENSE_JSON).is_file():
        dense_model, _ = artifact.load_model(run, "dense", device=device)
        say("dense model found, skipping the dense phase")
        summary["dense_skipped"] = True
    else:
        seed_all(0)
        dense_model = QPMModel(**model_cfg).to(device)
        if dist.is_main:
            run_log.drop_phase("dense", keep_epochs=checkpoint_epoch(ckpt_dir, "dense"))
        res = train_phase(dense_model, train_data, req.dense, phase="dense", seed=req.seed, test_data=test_data,
                          checkpoint_dir=ckpt_dir, on_epoch=run_log, progress=progress)
        summary["dense_tokens_per_second"] = res.tokens_per_second
        if dist.is_main:
            artifact.save_model(dense_model, run, "dense", info=info_base)
            clear_checkpoint(ckpt_dir, "dense")
        barrier()
    timings["dense"] = time.perf_counter() - t0

    # ---- pooled dense train features (selection input, mu/sigma of the sparse head)
    feat_path = run / artifact.DENSE_FEATURES
    if feat_path.is_file():
        arrays = artifact.read_npz(feat_path)
        dense_feats = torch.from_numpy(arrays["features"])
    else:
        dense_feats = collect_outputs(dense_model, train_data, 256, req.dense.bf16)["features"]
        if dist.is_main:
            artifact.atomic_write_npz(feat_path, features=dense_feats.numpy().astype(np.float32),
                                      labels=np.asarray(train_cache.labels, dtype=np.int64),
                                      class_names=np.asarray(class_names))
        barrier()
    mu, sigma = feature_stats(dense_feats)

    metrics: dict[str, Any] = {}
    metrics_path = run / artifact.METRICS
    if metrics_path.is_file() and resume:
        metrics = artifact.read_json(metrics_path)
    if dist.is_main and "dense" not in metrics:
        t0 = time.perf_counter()
        metrics["dense"] = _evaluate(dense_model, train_cache, test_cache, req, device, settings)
        timings["evaluate_dense"] = time.perf_counter() - t0
        artifact.atomic_write_json(metrics_path, metrics)
        artifact.save_model(dense_model, run, "dense", info={**info_base, "metrics": metrics["dense"]})

    if req.head == "linear-probe":  # the paper's probe has no selection and no finetuning (METHOD.md §5.3)
        final_model = dense_model
        if dist.is_main:
            metrics["final"] = metrics["dense"]
            artifact.atomic_write_json(metrics_path, metrics)
            artifact.save_model(final_model, run, "final", info={**info_base, "metrics": metrics["final"]})
        barrier()
        summary.update(metrics=metrics, timings=timings, selection=None)
        return summary

    # ---- select -> finetune (an iterative selector such as Q-SENN repeats both)
    from qpmcli.selection import load_selection, selection_summary

    t0 = time.perf_counter()
    if resume and (run / artifact.MODEL_JSON).is_file():
        final_model, _ = artifact.load_model(run, "final", device=device)
        sel = load_selection(run / artifact.SELECTION)
        say("final model found, skipping selection and finetuning")
    else:
        final_model, sel, ft_timings = _select_and_finetune(
            req, dense_model, dense_feats, mu, sigma, train_data, test_data, run, ckpt_dir, run_log, class_names,
            resume=resume, progress=progress, dist=dist, device=device, seed_all=seed_all)
        timings.update(ft_timings)
        if dist.is_main:
            artifact.save_model(final_model, run, "final", info=info_base)
            metrics.pop("final", None)
        barrier()
    summary["selection"] = selection_summary(sel)
    timings.setdefault("select_and_finetune", time.perf_counter() - t0)
    if dist.is_main and "final" not in metrics:
        t0 = time.perf_counter()
        metrics["final"] = _evaluate(final_model, train_cache, test_cache, req, device, settings)
        timings["evaluate_final"] = time.perf_counter() - t0
        artifact.atomic_write_json(metrics_path, metrics)
        artifact.save_model(final_model, run, "final", info={**info_base, "metrics": metrics["final"],
                                                             "selection_result": summary["selection"]})
    if dist.is_main and not (run / artifact.PROTOTYPES).is_dir():
        t0 = time.perf_counter()
        summary["prototypes"] = _prototypes(final_model, train_cache, req, settings, run, device)
        timings["prototypes"] = time.perf_counter() - t0
    barrier()
    summary.update(metrics=metrics, timings=timings)
    return summary


def _prototypes(model: QPMModel, train_cache: Any, req: TrainRequest, settings: Any, run: Path,
                device: str) -> dict[str, Any]:
    """Representative training patches per selected feature (``<run>/prototypes/``, for ``qpm explain --class``)."""
    from qpmcli.data import load_dataset
    from qpmcli.prototypes import build_prototypes

    try:
        dataset = load_dataset(req.dataset, root=req.data_root, split="train", settings=settings,
                               **req.dataset_options)
    except QpmError as exc:  # the tokens are cached but the images moved: the model is still complete
        return {"written": False, "reason": f"train images not readable: {exc}"}
    return build_prototypes(model, train_cache, dataset, run, device=device)


def _select_and_finetune(req: TrainRequest, model: QPMModel, dense_feats: torch.Tensor, mu: torch.Tensor,
                         sigma: torch.Tensor, train_data: TokenData, test_data: TokenData, run: Path, ckpt_dir: Path,
                         run_log: _RunLog, class_names: list[str], *, resume: bool, progress: bool, dist: DistInfo,
                         device: str, seed_all: Callable[[int], None]) -> tuple[QPMModel, Any, dict[str, float]]:
    """Selection (rank 0 solves, the others read the file) and finetuning, ``selector.iterations`` times.

    Iteration i > 0 (Q-SENN) re-poses the problem on the current adapter's pooled features, passes the previous
    selection and finetunes with the selector's ``finetune_schedule(i)`` (epochs, lr_scale). Every finished iteration
    is kept under ``checkpoints/`` so a resumed run continues with the next one.
    """
    import numpy as np

    from qpmcli.model import QPMModel as _Model
    from qpmcli.registry import get_registry
    from qpmcli.selection import build_problem, load_selection, save_selection, select

    selector = get_registry().get("selector", req.selector).factory()
    iterations = max(1, int(getattr(selector, "iterations", 1)))
    labels = np.asarray(train_data.labels.numpy(), dtype=np.int64)
    timings = {"select": 0.0, "finetune": 0.0}
    sel = None
    feats = dense_feats
    for it in range(iterations):
        last = it == iterations - 1
        tag = "" if iterations == 1 else f"-{it + 1}"
        phase = "finetune" + tag
        done = ckpt_dir / f"iteration{tag}.json"
        sel_path = run / (artifact.SELECTION if last else f"selection{tag}.json")
        if not last and resume and done.is_file():  # a finished earlier iteration (Q-SENN)
            doc = artifact.read_json(done)
            model = _Model.from_config(doc["model"]).to(device)
            from qpmcli.modelfile import confined

            model.load_state_dict(artifact.read_safetensors(confined(ckpt_dir, doc.get("weights"),
                                                                     f"{done} 'weights'"), device=device))
            sel = load_selection(sel_path)
            feats = None
            continue
        if feats is None:  # the problem of iteration > 0 comes from the current adapter
            feats = collect_pooled(model, train_data, 256, req.finetune.bf16)
            mu, sigma = feature_stats(feats)
        t0 = time.perf_counter()
        if dist.is_main and not (resume and sel_path.is_file()):
            problem = build_problem(feats.numpy(), labels, len(class_names), class_names)
            new = select(problem, selector=req.selector, n_features=req.n_selected, per_class=req.per_class,
                         time_limit=req.time_limit, seed=req.seed % 2**31, workers=req.workers, previous=sel,
                         progress=progress)
            save_selection(new, sel_path, class_names=class_names)
        barrier()
        sel = load_selection(sel_path)
        timings["select"] += time.perf_counter() - t0
        model.set_selection(sel.features, sel.weight, mu, sigma, bias=sel.bias, trainable_norm=sel.trainable_norm,
                            dropout=0.1 if sel.trainable_norm else 0.0)  # SLDD/Q-SENN head dropout (§7.1, C7)
        opts = req.finetune
        schedule = dict(selector.finetune_schedule(it) or {}) if iterations > 1 else {}
        if "epochs" in schedule:
            opts = replace(opts, epochs=int(schedule["epochs"]))
        if "lr" in schedule or "lr_scale" in schedule:
            opts = replace(opts, lr=float(schedule.get("lr", opts.lr)) * float(schedule.get("lr_scale", 1.0)))
        seed_all(1 + it)
        if dist.is_main:
            run_log.drop_phase(phase, keep_epochs=checkpoint_epoch(ckpt_dir, phase))
        t0 = time.perf_counter()
        train_phase(model, train_data, opts, phase=phase, seed=req.seed, test_data=test_data,
                    checkpoint_dir=ckpt_dir, on_epoch=run_log, progress=progress)
        timings["finetune"] += time.perf_counter() - t0
        if dist.is_main:
            if not last:
                weights = f"iteration{tag}.safetensors"
                artifact.atomic_write_safetensors(ckpt_dir / weights, dict(model.state_dict()))
                artifact.atomic_write_json(done, {"model": model.config, "weights": weights, "iteration": it + 1})
            clear_checkpoint(ckpt_dir, phase)
        barrier()
        feats = None
    if dist.is_main and iterations > 1:
        for p in ckpt_dir.glob("iteration-*"):
            p.unlink()
    assert sel is not None
    return model, sel, timings


def _norm(value: Any) -> Any:
    """JSON round trip, so tuples and lists compare equal."""
    import json

    return json.loads(artifact.to_json(value))
