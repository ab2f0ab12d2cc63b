"""Frozen backbones: loading by name, weight lookup, preprocessing and the official position-embedding resize rule.

Backbone *plugins* (``plugins/backbones``) describe concrete models; this module holds what they share:

- :func:`load_backbone` looks the name up in the plugin registry and calls the plugin's factory;
- :func:`resolve_weights` finds the weight file (explicit file > ``settings.weights_dir`` > local timm/Hugging Face
  cache, never a download) or raises a :class:`WeightsError` naming the expected path and the upstream source;
- :func:`read_state_dict` reads a foreign checkpoint safely (``torch.load(weights_only=True)`` or safetensors);
- :func:`interpolate_pos_embed` is the official DINOv2 ``interpolate_pos_encoding`` rule, applied once at load time;
- :class:`FrozenBackbone` is the ``qpmcli.contracts.Backbone`` implementation: preprocessing + a no-grad forward
  that returns ``(cls [B, D], patches [B, h*w, D])``.

Import cost: torch is imported inside functions; importing this module is cheap only up to the class definitions,
which need torch, so the CLI imports it lazily.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qpmcli.errors import ConfigError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
PREPROCESS_MODES = ("official", "reference")

# The reference implementation's per-dataset statistics (METHOD.md §2.2), used only by preprocess="reference".
REFERENCE_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cub200": ((0.4853, 0.4964, 0.4295), (0.2300, 0.2258, 0.2625)),
    "cars": ((0.4593, 0.4466, 0.4453), (0.2920, 0.2910, 0.2988)),
    "stanford-cars": ((0.4593, 0.4466, 0.4453), (0.2920, 0.2910, 0.2988)),
    "travelingbirds": ((0.4584, 0.4369, 0.3957), (0.2610, 0.2569, 0.2722)),
    "aircraft": ((0.4827, 0.5130, 0.5352), (0.2236, 0.2170, 0.2478)),
    "fgvc-aircraft": ((0.4827, 0.5130, 0.5352), (0.2236, 0.2170, 0.2478)),
}


# ------------------------------------------------------------------------------------------------------- loading
def load_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    preprocess: str = "official",
    settings: Any = None,
    device: str | None = None,
    **options: Any,
) -> FrozenBackbone:
    """Build the frozen backbone ``name`` (a registered plugin name, or a name under a plugin's prefix such as
    ``timm:<model>``).

    ``weights``: a file, ``"random"`` (random init, for tests/benchmarks) or ``None`` (look it up, see
    :func:`resolve_weights`). ``preprocess``: ``official`` (ImageNet mean/std, 224² squash) or ``reference`` (the
    paper code's dataset mean/std + per-image min-max, and pos-embed offset 0.1 without antialias for every variant).
    ``device``: ``None`` uses ``settings.device`` (``auto`` = CUDA when present). ``options``: ``dataset`` (for
    reference statistics), ``amp`` (bf16 autocast) and the plugin's own options (``image_size``, ``arch``...).

    The factory is called exactly as :func:`qpmcli.hookspecs.qpm_backbones` documents:
    ``factory(name=, weights=, preprocess=, settings=, dataset=, amp=, **plugin_options)``.
    """
    from qpmcli.registry import get_registry

    if preprocess not in PREPROCESS_MODES:
        raise ConfigError(f"unknown preprocess mode {preprocess!r}; choose one of {', '.join(PREPROCESS_MODES)}")
    if settings is None:
        from qpmcli.settings import resolve_settings

        settings, _ = resolve_settings()
    spec = get_registry().get("backbone", name)
    dataset = options.pop("dataset", None)
    amp = bool(options.pop("amp", False))
    backbone = spec.factory(name=name, weights=weights, preprocess=preprocess, settings=settings, dataset=dataset,
                            amp=amp, **options)
    dev = device or settings.torch_device()
    return backbone.to(dev)


def load_run_backbone(info: dict[str, Any], *, weights: str | None, settings: Any, device: str) -> Any:
    """Rebuild the run's frozen backbone (name, preprocessing mode, options) and check its weights digest."""
    digest = str(info.get("weights_digest") or "")
    if weights is None and digest.startswith("random"):
        weights = "random"  # a run trained on random-init weights (tests, benchmarks) rebuilds them exactly
    pcfg = info.get("preprocess") or {}
    opts = {"dataset": info.get("dataset"), **(info.get("backbone_options") or {})}  # as qpmcli.train builds it

    def build(**extra: Any) -> Any:
        return load_backbone(info["backbone"], weights=weights, preprocess=pcfg.get("mode", "official"),
                             settings=settings, device=device, **{**opts, **extra})

    backbone = build()
    size = [int(v) for v in info.get("image_size") or backbone.image_size]
    if list(backbone.image_size) != size:  # a run trained at a non-default size that its options do not record
        backbone = build(image_size=size)
    if digest and backbone.weights_digest != digest:
        raise WeightsError(
            f"backbone weights digest {backbone.weights_digest} does not match the run's {digest} (backbone "
            f"{info['backbone']}); pass the weights file the run was trained with via --weights")
    return backbone


def hf_cache_dirs() -> list[Path]:
    """Local Hugging Face hub cache folders (``HF_HUB_CACHE`` / ``HF_HOME`` / the default), existing ones only."""
    cands = []
    if os.environ.get("HF_HUB_CACHE"):
        cands.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        cands.append(Path(os.environ["HF_HOME"]) / "hub")
    cands.append(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface" / "hub")
    return [p for p in cands if p.is_dir()]


def torch_hub_checkpoint_dir() -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps downloaded files (searched, never written)."""
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    torch_home = os.environ.get("TORCH_HOME") or cache_home / "torch"
    return Path(torch_home) / "hub" / "checkpoints"


def find_in_local_caches(filenames: list[str], hf_repo: str | None) -> Path | None:
    """A weight file already on disk in the torch hub cache or the Hugging Face cache (``hf_repo``), else ``None``."""
    hub = torch_hub_checkpoint_dir()
    for fn in filenames:
        if (hub / fn).is_file():
            return hub / fn
    if hf_repo:
        for root in hf_cache_dirs():
            snaps = root / ("models--" + hf_repo.replace("/", "--")) / "snapshots"
            if snaps.is_dir():
                for snap in sorted(snaps.iterdir()):
                    for fn in ("model.safetensors", "pytorch_model.bin"):
                        if (snap / fn).is_file():
                            return snap / fn
    return None


def resolve_weights(
    weights: str | os.PathLike | None,
    settings: Any,
    *,
    filenames: list[str],
    source: str,
    hf_repo: str | None = None,
    backbone: str = "",
) -> Path | None:
    """The weight file to load, or ``None`` for ``weights="random"``.

    Order: explicit file; ``settings.weights_dir / <official file name>``; the local torch hub / Hugging Face cache.
    Never downloads. A miss raises a :class:`WeightsError` naming the expected path and where to get the file.
    """
    if weights is not None and str(weights) == "random":
        return None
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file() and not path.is_absolute() and settings is not None:
            alt = Path(settings.weights_dir) / path
            if alt.is_file():
                return alt
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist (backbone {backbone}; upstream: {source})")
        return path
    wdir = Path(settings.weights_dir) if settings is not None else None
    if wdir is not None:
        for fn in filenames:
            if (wdir / fn).is_file():
                return wdir / fn
    cached = find_in_local_caches(filenames, hf_repo)
    if cached is not None:
        return cached
    expected = (wdir / filenames[0]) if wdir is not None else Path(filenames[0])
    raise WeightsError(
        f"no weights for backbone {backbone}: expected {expected} (set QPM_WEIGHTS_DIR or pass --weights FILE); "
        f"download it from {source}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint without unpickling code: safetensors, or ``torch.load(weights_only=True)``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code, wrong format
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    for key in ("model", "state_dict", "teacher"):
        if key in state and isinstance(state[key], dict) and not isinstance(state[key], torch.Tensor):
            state = state[key]
    return state


def file_digest(path: Path) -> str:
    """sha256 (first 16 hex chars) of a weights file: identifies the weights in cache keys and artifacts."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, backbone: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error listing the first mismatching keys."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        msg = str(exc).replace("\n", " ")
        raise WeightsError(f"weights file {path} does not fit backbone {backbone}: {msg[:400]}") from exc


# ----------------------------------------------------------------------------------------- pos-embed resize rule
def interpolate_pos_embed(
    patch_pos: torch.Tensor, new_grid: tuple[int, int], *, offset: float, antialias: bool
) -> torch.Tensor:
    """Resize patch position embeddings ``[1, M*M, D]`` to ``new_grid`` with the official DINOv2 rule.

    Mirrors ``DinoVisionTransformer.interpolate_pos_encoding`` (facebookresearch/dinov2): bicubic; with an offset
    the output is requested by ``scale_factor=((h0 + offset) / M, (w0 + offset) / M)`` (the historical kludge of
    dino issue #8), without one by ``size=(h0, w0)``; ``antialias`` as configured (False for the plain hub models,
    True for the register models, whose offset is 0). Computed in float32, returned in the input dtype.
    """
    n = patch_pos.shape[1]
    m = int(round(n**0.5))
    if m * m != n:
        raise WeightsError(f"position embedding has {n} patch entries, not a square grid")
    dim = patch_pos.shape[-1]
    h0, w0 = new_grid
    grid = patch_pos.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        kwargs: dict[str, Any] = {"scale_factor": (float(h0 + offset) / m, float(w0 + offset) / m)}
    else:
        kwargs = {"size": (h0, w0)}
    out = nn.functional.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    if tuple(out.shape[-2:]) != (h0, w0):
        raise WeightsError(f"position-embedding resize gave grid {tuple(out.shape[-2:])}, expected {(h0, w0)}")
    return out.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim).to(patch_pos.dtype)


# ------------------------------------------------------------------------------------------------ preprocessing
def make_preprocess_config(
    mode: str, size: tuple[int, int], *, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation: str = "bilinear",
    minmax: bool = False, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON-able description from which :func:`preprocess_image` reproduces preprocessing exactly."""
    cfg = {"mode": mode, "size": [int(size[0]), int(size[1])], "resize": "squash", "interpolation": interpolation,
           "mean": [float(v) for v in mean], "std": [float(v) for v in std], "minmax": bool(minmax)}
    if extra:
        cfg.update(extra)
    return cfg


def preprocess_image(image: Any, config: dict[str, Any]) -> torch.Tensor:
    """PIL image (any mode) → float32 ``[3, H, W]`` following ``config`` (see :func:`make_preprocess_config`).

    Squash-resize to ``size`` (H, W) with PIL (what torchvision's ``Resize`` does on PIL images), scale to [0, 1],
    normalise with mean/std and, for the reference mode, rescale the whole image to [0, 1] by its own min and max.
    """
    from qpmcli.images import preprocess_array

    # numpy, not torch: this runs in DataLoader workers, where small torch ops pay thread-pool overhead
    return torch.from_numpy(preprocess_array(image, config))


# ---------------------------------------------------------------------------------------------- the backbone
class FrozenBackbone(nn.Module):
    """A frozen feature extractor satisfying :class:`qpmcli.contracts.Backbone`.

    ``features(x)`` is a callable returning ``(cls [B, D], patches [B, h*w, D])`` from a preprocessed batch; the
    wrapper adds eval mode, ``requires_grad=False``, no-grad, optional bf16 autocast and float32 outputs.
    """

    def __init__(
        self,
        *,
        name: str,
        model: nn.Module,
        features: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        embed_dim: int,
        patch_size: int,
        image_size: tuple[int, int],
        grid: tuple[int, int],
        weights_digest: str,
        preprocess_config: dict[str, Any],
        weights_path: str | None = None,
        amp: bool = False,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self._features = features
        self.name = name
        self.embed_dim = int(embed_dim)
        self.patch_size = int(patch_size)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.grid = (int(grid[0]), int(grid[1]))
        self.weights_digest = weights_digest
        self.weights_path = weights_path
        self.preprocess_config = preprocess_config
        self.amp = amp
        self.info = dict(info or {})
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Always eval: a frozen backbone never switches BatchNorm/Dropout to training behaviour."""
        return super().train(False)

    def preprocess(self, image: Any) -> torch.Tensor:
        return preprocess_image(image, self.preprocess_config)

    def raw_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cls, patches)`` of the wrapped model as it computes them: no autocast, no no-grad, no dtype cast (what
        an exported graph traces)."""
        return self._features(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        with torch.no_grad():
            if self.amp:
                with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                    cls, patches = self._features(x)
            else:
                cls, patches = self._features(x)
        return cls.float(), patches.float()

    def describe(self) -> dict[str, Any]:
        """JSON-able facts stored with caches and artifacts."""
        return {"name": self.name, "embed_dim": self.embed_dim, "patch_size": self.patch_size,
                "image_size": list(self.image_size), "grid": list(self.grid), "weights_digest": self.weights_digest,
                "preprocess": self.preprocess_config, **self.info}


def preprocess_config_for(preprocess: str, size: tuple[int, int], mean: Any = IMAGENET_MEAN, std: Any = IMAGENET_STD,
                          dataset: str | None = None) -> dict[str, Any]:
    """The preprocessing config of a backbone: ``official`` uses the backbone's own ``mean``/``std``; ``reference``
    the reference code's statistics of ``dataset`` and a per-image min-max rescale (METHOD.md §2.2)."""
    if preprocess == "reference":
        mean, std, stats_of = reference_stats(dataset)
        return make_preprocess_config("reference", size, mean=mean, std=std, minmax=True, extra={"stats_of": stats_of})
    return make_preprocess_config("official", size, mean=mean, std=std)


def token_features(model: nn.Module, layout: str, forward: str = "forward_features",
                   ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``x -> (cls [B, D], patches [B, h*w, D])`` from ``model.<forward>(x)`` (timm's ``forward_features`` by
    default) for a token ``layout``:

    - ``"tokens"``: a transformer's ``[B, P + h*w, D]`` with ``P = model.num_prefix_tokens`` prefix tokens (CLS first,
      then registers): CLS is ``tokens[:, 0]`` (the mean of all tokens when there is no prefix token), patches are
      ``tokens[:, P:]``;
    - ``"map"``: a CNN feature map ``[B, D, h, w]``: CLS is its spatial mean, patches are its cells in row-major order.
    """
    run = getattr(model, forward)
    if layout == "map":
        def from_map(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            fmap = run(x)
            return fmap.mean(dim=(2, 3)), fmap.flatten(2).transpose(1, 2)

        return from_map
    if layout != "tokens":
        raise ConfigError(f"unknown token layout {layout!r}; use 'tokens' or 'map'")
    prefix = int(getattr(model, "num_prefix_tokens", 0))

    def from_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = run(x)
        cls = tokens[:, 0] if prefix > 0 else tokens.mean(dim=1)
        return cls, tokens[:, prefix:]

    return from_tokens


def build_frozen_backbone(
    *,
    name: str,
    create: Callable[[], nn.Module],
    weights_path: Path | None,
    image_size: tuple[int, int],
    mean: Any = IMAGENET_MEAN,
    std: Any = IMAGENET_STD,
    layout: str = "tokens",
    forward: str = "forward_features",
    checkpoint_filter: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None,
    adapt: Callable[[nn.Module], dict[str, Any] | None] | None = None,
    preprocess: str = "official",
    dataset: str | None = None,
    amp: bool = False,
    random_digest: str = "random",
    embed_dim: int | None = None,
    grid: tuple[int, int] | None = None,
    info: dict[str, Any] | None = None,
) -> FrozenBackbone:
    """A :class:`FrozenBackbone` from what a model family supplies, the way timm's ``build_model_with_cfg`` builds a
    model from its config. A backbone factory resolves its weights file and calls this with:

    - ``create()``: the architecture with random weights (called under a fixed seed, so ``"random"`` weights are the
      same in every process: caches, resume and ranks agree);
    - ``weights_path``: the checkpoint (``None``: keep the random weights, digest ``random_digest``), read without
      unpickling code, adapted by ``checkpoint_filter(state, model)`` (e.g. timm's ``checkpoint_filter_fn`` for an
      official checkpoint), loaded strictly, identified by its sha256;
    - ``adapt(model)``: runs after loading (e.g. the position-embedding resize); returns entries to add to the
      preprocessing config, or ``None``;
    - ``mean``/``std``: the backbone's own normalisation (``preprocess="reference"`` uses the dataset's instead);
    - ``layout``: how ``model.<forward>`` (``forward_features``) lays out its tokens (:func:`token_features`), or
      ``"auto"`` (decided by one probe forward pass: a 4-d output is a feature ``map``);
    - ``embed_dim``/``grid``: the model's ``embed_dim`` attribute and patch grid, else read from one probe forward
      pass at ``image_size``.
    Weight-file problems are :class:`WeightsError` naming the file.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create()
    if weights_path is not None:
        state = read_state_dict(weights_path)
        if checkpoint_filter is not None:
            try:
                state = checkpoint_filter(state, model)
            except Exception as exc:  # a checkpoint of another architecture
                raise WeightsError(f"weights file {weights_path} is not a {name} checkpoint: {exc}") from exc
        load_strict(model, state, weights_path, name)
        digest = file_digest(weights_path)
    else:
        digest = random_digest
    extra_config = adapt(model) if adapt is not None else None
    model.eval()
    if embed_dim is None and layout == "tokens":
        embed_dim = getattr(model, "embed_dim", None)
    if layout == "auto" or embed_dim is None or grid is None:
        with torch.no_grad():
            probe = getattr(model, forward)(torch.zeros(1, 3, *image_size))
        if layout == "auto":
            layout = "map" if probe.ndim == 4 else "tokens"
        if layout == "map":
            embed_dim, grid = int(probe.shape[1]), (int(probe.shape[2]), int(probe.shape[3]))
        else:
            n = probe.shape[1] - int(getattr(model, "num_prefix_tokens", 0))
            gs = getattr(getattr(model, "patch_embed", None), "grid_size", None)
            grid = (int(gs[0]), int(gs[1])) if gs is not None else (int(round(n**0.5)), int(round(n**0.5)))
            embed_dim = int(probe.shape[-1])
    features = token_features(model, layout, forward)
    pcfg = preprocess_config_for(preprocess, image_size, mean, std, dataset)
    pcfg.update(extra_config or {})
    return FrozenBackbone(
        name=name, model=model, features=features, embed_dim=embed_dim, patch_size=image_size[0] // grid[0],
        image_size=image_size, grid=grid, weights_digest=digest, preprocess_config=pcfg,
        weights_path=str(weights_path) if weights_path else None, amp=amp, info=info)


def parse_image_size(image_size: int | tuple[int, int] | None, default: int = DEFAULT_IMAGE_SIZE) -> tuple[int, int]:
    if image_size is None:
        return (default, default)
    if isinstance(image_size, int):
        return (image_size, image_size)
    return (int(image_size[0]), int(image_size[1]))


def reference_stats(dataset: str | None) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """The reference code's mean/std for ``dataset``: CUB's when none is named (the paper's default dataset),
    ImageNet's for datasets the reference code has no statistics for."""
    key = (dataset or "cub200").lower()
    if key in REFERENCE_STATS:
        mean, std = REFERENCE_STATS[key]
        return mean, std, key
    return IMAGENET_MEAN, IMAGENET_STD, "imagenet"
