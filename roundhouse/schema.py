"""What every config section shares: a strict base, the value types the YAML uses (sizes, paths
relative to the config file), and errors that name the key (`models[0].max_model_len: ...`).

The whole file is one pydantic model (roundhouse.catalogue.ConfigFile); `roundhouse config
schema` prints its JSON Schema, which editors use to check and complete a config as it is typed.
"""
from __future__ import annotations

import pathlib
import re
from typing import Annotated, Any, TypeVar

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr,
                      TypeAdapter, ValidationError, ValidationInfo, WithJsonSchema)

M = TypeVar("M")

# Unknown keys refused and values frozen; lists from YAML become tuples where a field says so.
CONFIG = ConfigDict(extra="forbid", frozen=True)
DATA = ConfigDict(extra="forbid")   # the same for pydantic dataclasses (frozen by their decorator)


class Strict(BaseModel):
    model_config = CONFIG


BASE = "base"   # validation context: the directory relative paths are taken from (the config file's)


def relative_to_config(value: str, info: ValidationInfo) -> str:
    """`value` (a path) made absolute from the config file's directory, when validated with one."""
    base = (info.context or {}).get(BASE)
    if base is None or not value:
        return value
    p = pathlib.Path(value)
    return str(p if p.is_absolute() else (pathlib.Path(base) / p).resolve())


def none_is(empty: Any) -> BeforeValidator:
    """A key written with nothing under it (`tenants:`, YAML null) means `empty`."""
    return BeforeValidator(lambda value: empty if value is None else value)


# A file or directory named in the config: relative paths are taken from the config file's directory.
ConfigPath = Annotated[StrictStr, Field(min_length=1), AfterValidator(relative_to_config)]
NonEmpty = Annotated[StrictStr, Field(min_length=1)]

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9}
_SIZE = r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$"


def parse_size(value: Any) -> int:
    """Bytes from an integer or a string like '256MiB' / '1.5 GiB'; ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = re.fullmatch(_SIZE, value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(f"must be a size in bytes (an integer, or like '256MiB', '2GiB'), got {value!r}")


# Bytes, written as an integer or with a unit (KiB, MiB, GiB, TiB; kB, MB, GB).
Size = Annotated[StrictInt, BeforeValidator(parse_size), Field(ge=0), WithJsonSchema({
    "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": _SIZE}],
    "description": "bytes: an integer, or a number with a unit (KiB, MiB, GiB, TiB, kB, MB, GB)"})]


def validate(model: type[M], raw: Any, error: type[Exception], context: dict | None = None) -> M:
    """`model` (a pydantic model or dataclass, or any type pydantic validates) from `raw`;
    raises `error` naming the first bad key (`tenants[0].limits.rpm: ...`)."""
    try:
        return TypeAdapter(model).validate_python(raw, context=context)
    except ValidationError as e:
        raise error(message(e)) from None


_KEYED = re.compile(r"^[A-Za-z_][\w.\[\]-]*: ")


def message(e: ValidationError) -> str:
    """The first error of `e`, as `where: what` (`models[0].gpu: ...`)."""
    first = e.errors()[0]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    kind = first["type"]
    if kind == "value_error":
        what = str(first["ctx"]["error"])   # our own check: its words, without pydantic's "Value error, "
        if where and _KEYED.match(what):    # it names a key inside `where`: one path
            return f"{where}.{what}"
    elif kind in ("extra_forbidden", "unexpected_keyword_argument"):
        what = "unknown key"
    elif kind in ("missing", "missing_argument"):
        what = "required"
    elif kind in ("tuple_type", "list_type"):
        what = f"must be a list, got {type(first['input']).__name__}"
    elif kind in ("dict_type", "model_type", "model_attributes_type", "dataclass_type", "dataclass_exact_type"):
        what = f"must be a mapping, got {type(first['input']).__name__}"
    else:
        what = first["msg"]
    return f"{where}: {what}" if where else what


def json_schema(model: type) -> dict:
    """The JSON Schema of what `model` accepts (its YAML form)."""
    return TypeAdapter(model).json_schema(mode="validation")
