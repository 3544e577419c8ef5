"""The model catalogue: which models exist, under which names, with which limits.

Loaded once from YAML at each service's edge and passed down. Every error names the bad key:

    models:
      - name: tiny-0               # required, unique across names and aliases
        aliases: [chat]
        path: var/models/tiny-0    # model directory (relative paths: to the YAML file)
        max_model_len: 1024        # context length (prompt + completion)
        max_tokens_limit: 512      # optional cap on max_tokens (default: max_model_len)
        default_max_tokens: 128    # used when a request sets none
        max_num_seqs: 64           # engine slots
        kv_cache_bytes: 256MiB     # KV-cache reservation per engine (bytes, or with KiB/MiB/GiB)
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml


class ConfigError(ValueError):
    """The configuration file is wrong; the message names the key."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    max_model_len: int
    aliases: tuple[str, ...] = ()
    max_tokens_limit: int = 0       # 0: max_model_len
    default_max_tokens: int = 256
    max_num_seqs: int = 64
    kv_cache_bytes: int = 256 * 2**20

    @property
    def token_limit(self) -> int:
        return self.max_tokens_limit or self.max_model_len


@dataclasses.dataclass(frozen=True)
class Catalogue:
    models: tuple[ModelSpec, ...]

    def __post_init__(self):
        index: dict[str, ModelSpec] = {}
        for m in self.models:
            for key in (m.name, *m.aliases):
                if key in index:
                    raise ConfigError(f"models: name or alias {key!r} is used twice")
                index[key] = m
        object.__setattr__(self, "_index", index)

    def resolve(self, name: str) -> ModelSpec | None:
        """The model a request's `model` field names (a name or an alias), or None."""
        return self._index.get(name)  # type: ignore[attr-defined]

    def get(self, name: str) -> ModelSpec:
        spec = self.resolve(name)
        if spec is None:
            raise ConfigError(f"model {name!r} is not in the catalogue")
        return spec


_FIELDS = {f.name: f for f in dataclasses.fields(ModelSpec)}
_REQUIRED = {"name", "path", "max_model_len"}


def _model(raw: Any, where: str, base: pathlib.Path) -> ModelSpec:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a mapping, got {type(raw).__name__}")
    unknown = set(raw) - set(_FIELDS)
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(_FIELDS))})")
    missing = _REQUIRED - set(raw)
    if missing:
        raise ConfigError(f"{where}.{sorted(missing)[0]}: required")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        values[key] = _coerce(f"{where}.{key}", _FIELDS[key].type, value)
    path = pathlib.Path(values["path"])
    values["path"] = str(path if path.is_absolute() else (base / path).resolve())
    spec = ModelSpec(**values)
    for key in ("max_model_len", "default_max_tokens", "max_num_seqs"):
        if getattr(spec, key) <= 0:
            raise ConfigError(f"{where}.{key}: must be > 0")
    if spec.max_tokens_limit < 0:
        raise ConfigError(f"{where}.max_tokens_limit: must be >= 0")
    if spec.kv_cache_bytes <= 0:
        raise ConfigError(f"{where}.kv_cache_bytes: must be > 0")
    if spec.default_max_tokens > spec.token_limit:
        raise ConfigError(f"{where}.default_max_tokens: above the model's token limit {spec.token_limit}")
    return spec


def _coerce(where: str, typ: str, value: Any) -> Any:
    if typ == "str":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: must be a non-empty string")
        return value
    if typ == "int" and where.endswith("_bytes"):
        return parse_size(where, value)
    if typ == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer, got {value!r}")
        return value
    if typ == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: must be a number, got {value!r}")
        return float(value)
    if typ == "tuple[str, ...]":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where}: must be a list of non-empty strings")
        return tuple(value)
    raise AssertionError(typ)


_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_size(where: str, value: Any) -> int:
    """Bytes from an integer or a string like '256MiB' / '1.5 GiB'."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ConfigError(f"{where}: must be a size in bytes (an integer, or like '256MiB', '2GiB'), got {value!r}")


def from_mapping(raw: Any, base: pathlib.Path = pathlib.Path(".")) -> Catalogue:
    if not isinstance(raw, Mapping) or "models" not in raw:
        raise ConfigError("models: required (a list of models)")
    models = raw["models"]
    if not isinstance(models, list) or not models:
        raise ConfigError("models: must be a non-empty list")
    return Catalogue(tuple(_model(m, f"models[{i}]", base) for i, m in enumerate(models)))


def load(path: str | pathlib.Path) -> Catalogue:
    path = pathlib.Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return from_mapping(raw, path.parent)


def dump(models: Iterable[ModelSpec]) -> str:
    """YAML for a catalogue (used to write the embedded defaults)."""
    out = []
    for m in models:
        d = {k: v for k, v in dataclasses.asdict(m).items() if v != _FIELDS[k].default or k in _REQUIRED}
        if "aliases" in d:
            d["aliases"] = list(d["aliases"])
        out.append(d)
    return yaml.safe_dump({"models": out}, sort_keys=False)
