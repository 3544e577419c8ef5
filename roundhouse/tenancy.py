"""Tenants: who may call the router, which models each may use, and the limits each is held to.

The catalogue's optional `tenants` section (validated by the pydantic models below; an error
names the bad key):

    tenants:
      - name: team-a                   # letters, digits, _ and - (it names the tenant's counters)
        keys:                          # one or more API keys, each given one way:
          - sha256: 9f86d0...          #   the SHA-256 of the key, hex (`roundhouse key new` makes both)
          - env: TEAM_A_KEY            #   an environment variable holding the key (a Kubernetes Secret)
          - file: /run/secrets/team-a  #   a file holding the key (trailing newline ignored)
        models: [chat, "code*"]        # names, aliases, adapters or shell patterns; default: every model.
                                       # "auto" routes only among these.
        limits:                        # all optional; enforced across every router (counters in NATS)
          requests_per_minute: 600
          tokens_per_minute: 100000    # prompt + generated tokens, charged when a request ends
          tokens_per_day: 2000000      # per UTC day
          concurrent_requests: 16
        priority: normal               # high, normal (default) or low: under load a model's
                                       # workers start a higher class's requests first

With no tenants, the router asks for no key. Keys are only ever held as their SHA-256: what the
router compares, logs and counts by is the tenant's name. The router reads `env` and `file` keys
at its start (`key_digests`); other services never need them.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import pathlib
import secrets
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StrictInt, StrictStr, model_validator

from roundhouse import subjects
from roundhouse.schema import ConfigPath, none_is
from roundhouse.schema import Strict as _Strict
from roundhouse.schema import validate

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
KEY_PREFIX = "rh-"   # of the keys `new_key` makes (any string of 16+ characters is accepted as a key)
MIN_KEY_CHARS = 16


class TenancyError(ValueError):
    """The `tenants` section is wrong; the message names the key."""


class KeyRef(_Strict):
    """One API key, given exactly one way."""
    sha256: StrictStr | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key, lowercase hex")
    env: StrictStr | None = Field(None, min_length=1, description="environment variable holding the key")
    file: ConfigPath | None = Field(None, description="file holding the key (relative to the config file)")

    @model_validator(mode="after")
    def _one_way(self) -> "KeyRef":
        given = [k for k in ("sha256", "env", "file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of sha256, env, file (got {', '.join(given) or 'none'})")
        return self


class Limits(_Strict):
    requests_per_minute: StrictInt | None = Field(None, gt=0)
    tokens_per_minute: StrictInt | None = Field(None, gt=0, description="prompt + generated tokens, charged when a request ends")
    tokens_per_day: StrictInt | None = Field(None, gt=0, description="prompt + generated tokens per UTC day")
    concurrent_requests: StrictInt | None = Field(None, gt=0, description="requests in flight at once, across every router")

    @property
    def any(self) -> bool:
        return any(v is not None for v in self.model_dump().values())


class TenantSpec(_Strict):
    name: StrictStr = Field(pattern=NAME_PATTERN)
    keys: tuple[KeyRef, ...] = Field(min_length=1)
    models: tuple[StrictStr, ...] = Field(("*",), min_length=1, description="names, aliases, adapters or shell patterns")
    limits: Limits = Limits()
    priority: Literal["high", "normal", "low"] = Field(
        subjects.NORMAL, description="its requests' class: under load a worker starts higher classes first "
                                     "(a lower class still gets a turn), and the manager loads for them first")


def _unique_names(tenants: tuple[TenantSpec, ...]) -> tuple[TenantSpec, ...]:
    names = [t.name for t in tenants]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"name {name!r} is used twice")
    return tenants


# The `tenants` section: names unique; `tenants:` with nothing under it is none.
Tenants = Annotated[tuple[TenantSpec, ...], none_is(()), AfterValidator(_unique_names)]


class _Section(_Strict):
    tenants: Tenants


class AdminSpec(_Strict):
    """`admin`: who may change residency, and what proves a worker is one of ours.

        admin:
          keys: [{env: ROUNDHOUSE_ADMIN_KEY}]       # the manager's pin / unpin / load / evict / drain need one
          worker_key: {file: secrets/worker.key}    # workers send it with every report; the manager checks it

    Without `keys` anyone who reaches the manager's port may call them; without `worker_key` any
    report is believed (which re-points a model's traffic at whatever address it names)."""
    keys: tuple[KeyRef, ...] = ()
    worker_key: KeyRef | None = Field(None, description="env or file: workers send the key itself")

    @model_validator(mode="after")
    def _worker_key_readable(self) -> "AdminSpec":
        if self.worker_key is not None and self.worker_key.sha256 is not None:
            raise ValueError("worker_key: give env or file (workers send the key itself, so a hash is not enough)")
        return self


class _AdminSection(_Strict):
    admin: AdminSpec


def parse_admin(raw: Any) -> AdminSpec:
    """The `admin` section, validated; raises TenancyError naming the first bad key."""
    return validate(_AdminSection, {"admin": raw}, TenancyError).admin


def parse(raw: Any) -> tuple[TenantSpec, ...]:
    """The `tenants` section, validated; raises TenancyError naming the first bad key."""
    return validate(_Section, {"tenants": raw}, TenancyError).tenants


def allowed_models(tenant: TenantSpec, names: Mapping[str, Iterable[str]]) -> frozenset[str]:
    """What `tenant` may call, from `names` (what each servable thing is called: a model's name
    and aliases, an adapter's name, keyed by that name). Raises TenancyError for a pattern that
    matches nothing (a typo would otherwise lock a tenant out, or in)."""
    allowed: set[str] = set()
    for i, pattern in enumerate(tenant.models):
        hits = {key for key, called in names.items() if any(fnmatch.fnmatchcase(n, pattern) for n in called)}
        if not hits:
            raise TenancyError(f"tenants[{tenant.name}].models[{i}]: {pattern!r} matches no model, alias or adapter")
        allowed |= hits
    return frozenset(allowed)


def bearer(credential: str | None) -> str:
    """The key in a credential: "Bearer <key>" (HTTP's form; any case) or the key alone."""
    key = (credential or "").strip()
    return key[7:].strip() if key[:7].lower() == "bearer " else key


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_digests(tenant: TenantSpec, base: pathlib.Path = pathlib.Path("."),
                environ: Mapping[str, str] = os.environ) -> list[str]:
    """The SHA-256 of each of `tenant`'s keys, reading `env` and `file` keys now. Raises
    TenancyError naming the key that cannot be read or is too short (never its value)."""
    return [digest_of(ref, f"tenants[{tenant.name}].keys[{i}]", base, environ) for i, ref in enumerate(tenant.keys)]


def digest_of(ref: KeyRef, where: str, base: pathlib.Path = pathlib.Path("."),
               environ: Mapping[str, str] = os.environ) -> str:
    """The SHA-256 of the key `ref` gives."""
    return ref.sha256 if ref.sha256 is not None else digest(read_key(ref, where, base, environ))


def read_key(ref: KeyRef, where: str, base: pathlib.Path = pathlib.Path("."),
             environ: Mapping[str, str] = os.environ) -> str:
    """The key itself, from its environment variable or file. Raises TenancyError naming `where`
    when it cannot be read or is too short (never its value)."""
    if ref.env is not None:
        key = environ.get(ref.env)
        if key is None:
            raise TenancyError(f"{where}.env: environment variable {ref.env} is not set")
    elif ref.file is not None:
        path = pathlib.Path(ref.file) if pathlib.Path(ref.file).is_absolute() else base / ref.file
        try:
            key = path.read_text().rstrip("\r\n")
        except OSError as e:
            raise TenancyError(f"{where}.file: cannot read {path}: {e.strerror}") from None
    else:
        raise TenancyError(f"{where}: only its hash is given; the key itself is needed here")
    if len(key) < MIN_KEY_CHARS:
        raise TenancyError(f"{where}: the key is shorter than {MIN_KEY_CHARS} characters")
    return key


@dataclasses.dataclass(frozen=True)
class AdminCredentials:
    """What the manager checks, resolved at its edge: admin key digests, the worker key's digest."""
    admin: frozenset[str] = frozenset()
    worker: str = ""

    @classmethod
    def of(cls, spec: "AdminSpec | None", environ: Mapping[str, str] = os.environ) -> "AdminCredentials":
        if spec is None:
            return cls()
        admin = frozenset(digest_of(k, f"admin.keys[{i}]", environ=environ) for i, k in enumerate(spec.keys))
        worker = digest(read_key(spec.worker_key, "admin.worker_key", environ=environ)) if spec.worker_key else ""
        return cls(admin, worker)

    def allows(self, credential: str | None, worker: bool = False) -> bool:
        """Whether `credential` ("Bearer <key>" or the key) is an admin key (or, `worker`, the
        worker key). True when no such key is configured."""
        wanted = self.worker if worker else self.admin
        if not wanted:
            return True
        d = digest(bearer(credential))
        return d == wanted if worker else d in wanted


def new_key() -> tuple[str, str]:
    """A fresh API key and its SHA-256 (what goes in the config)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, digest(key)
