"""Settings: CLI flags over ``QPM_*`` environment variables over TOML config files over defaults.

Config files, later ones winning: the user config (``$XDG_CONFIG_HOME/qpm/config.toml``, default
``~/.config/qpm/config.toml``), then ``./qpm.toml``. ``QPM_CONFIG=path.toml`` replaces both with one explicit file.
Resolved once per command (``resolve_settings``) and saved with every run; there is no global mutable state.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from qpmcli.errors import ConfigError

ENV_PREFIX = "QPM_"
MAX_NUM_WORKERS = 256  # DataLoader worker processes
DEFAULT_SEED = 383534468  # the reference implementation's default seed (METHOD.md §5.1)


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def user_config_file() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "qpm" / "config.toml"


def config_files() -> list[Path]:
    """The TOML files consulted, lowest priority first."""
    explicit = os.environ.get(ENV_PREFIX + "CONFIG")
    if explicit:
        return [Path(explicit).expanduser()]
    return [user_config_file(), Path.cwd() / "qpm.toml"]


def _explicit_config() -> Path | None:
    """``QPM_CONFIG``'s file, which must exist (a typo there must not silently fall back to the defaults)."""
    explicit = os.environ.get(ENV_PREFIX + "CONFIG")
    if not explicit:
        return None
    path = Path(explicit).expanduser()
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file"
        raise ConfigError(f"QPM_CONFIG={explicit}: the config file {what}; fix the path or unset QPM_CONFIG")
    return path


class QpmSettings(BaseSettings):
    """Where qpm finds data, weights and caches, and how it runs."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    data_root: Path | None = None
    """Root folder of the dataset (e.g. ``~/data/CUB_200_2011``); datasets that ship with qpm need none."""
    weights_dir: Path = Field(default_factory=lambda: _cache_home() / "qpm" / "weights")
    """Folder searched for official backbone weight files (e.g. ``dinov2_vitb14_reg4_pretrain.pth``)."""
    runs_dir: Path = Path("runs")
    """Where ``qpm train`` creates run directories."""
    cache_dir: Path = Field(default_factory=lambda: _cache_home() / "qpm" / "tokens")
    """Where token caches (frozen backbone outputs) are stored."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    seed: int = DEFAULT_SEED
    """Seed for every random number generator."""
    num_workers: int = min(4, os.cpu_count() or 1)
    """DataLoader worker processes for image decoding."""
    model: str | None = None
    """The model ``qpm explain``/``predict``/``export``/``evaluate`` use when none is given (a run folder or an
    ``.onnx`` file); unset = the current run (the one ``qpm train`` or ``qpm demo`` wrote last)."""
    state_dir: Path = Field(default_factory=lambda: _cache_home() / "qpm")
    """qpm's own state (the current-run pointer); next to the default token cache."""

    @field_validator("data_root", "weights_dir", "runs_dir", "cache_dir", "state_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else Path(os.path.expandvars(str(value))).expanduser()

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        from qpmcli.device import is_device

        if not is_device(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {value!r}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int) -> int:
        if not 0 <= value < 2**63:  # torch's generators take 64-bit seeds; a negative one has no meaning
            raise ValueError(f"seed must be between 0 and 2**63 - 1, not {value}")
        return value

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value: int) -> int:
        if not 0 <= value <= MAX_NUM_WORKERS:  # each one is a process: 100000 of them is a fork bomb, not a setting
            raise ValueError(f"num_workers must be between 0 and {MAX_NUM_WORKERS}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        files = [TomlConfigSettingsSource(settings_cls, toml_file=p) for p in reversed(config_files()) if p.is_file()]
        return (init_settings, env_settings, *files)

    def torch_device(self) -> str:
        """The concrete PyTorch device of the ``device`` setting (``qpmcli.device.torch_device``)."""
        from qpmcli.device import torch_device

        return torch_device(self.device)


MAX_CONFIG_BYTES = 1 << 20  # a settings file is a few lines; a bigger one is not a qpm config


def _read_toml(path: Path) -> dict[str, Any]:
    """A config file (only regular files are read: the callers skip or refuse anything else, so a pipe never
    blocks); every problem is one :class:`ConfigError` naming the file."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is {size} bytes; a qpm config is a few lines of TOML")
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); TOML files are "
                          f"UTF-8") from exc
    except RecursionError as exc:
        raise ConfigError(f"config file {path} nests tables or arrays too deeply to be a qpm config") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc


def resolve_settings(**cli: Any) -> tuple[QpmSettings, dict[str, str]]:
    """Resolve settings from ``cli`` flags (``None`` = not given), env, config files and defaults.

    Returns the settings and, per field, where its value came from: ``flag``, ``env QPM_X``, the file path or
    ``default``.
    """
    overrides = {k: v for k, v in cli.items() if v is not None}
    unknown = set(overrides) - set(QpmSettings.model_fields)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    sources: dict[str, str] = {name: "default" for name in QpmSettings.model_fields}
    _explicit_config()
    for path in config_files():
        if path.is_file():
            data = _read_toml(path)
            bad = set(data) - set(QpmSettings.model_fields)
            if bad:
                raise ConfigError(f"config file {path}: unknown key(s) {', '.join(sorted(bad))}; "
                                  f"known: {', '.join(QpmSettings.model_fields)}")
            for key in data:
                sources[key] = str(path)
    for name in QpmSettings.model_fields:
        env = ENV_PREFIX + name.upper()
        if os.environ.get(env) is not None:
            sources[name] = f"env {env}"
    for name in overrides:
        sources[name] = "flag"
    try:
        settings = QpmSettings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        origin = sources.get(field, "")
        raise ConfigError(f"invalid setting {field} (from {origin}): {err.get('msg')}") from exc
    return settings, sources
