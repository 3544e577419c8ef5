"""What the pydantic-validated config sections share: a strict base, and errors that name the key."""
from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Unknown keys refused, values frozen; lists from YAML become tuples where a field says so."""
    model_config = ConfigDict(extra="forbid", frozen=True)


def validate(model: type[M], raw: dict[str, Any], error: type[Exception]) -> M:
    """`model` from `raw`; raises `error` naming the first bad key (`tenants[0].limits.rpm: ...`)."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        raise error(f"{where}: {first['msg']}") from None
