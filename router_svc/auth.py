"""Who is calling: an API key names a tenant (roundhouse.tenancy), which the rest of the request
path uses for what it may call and what it is limited to.

Keys arrive as `Authorization: Bearer <key>` (HTTP, and a NATS job submission's header) or as
`authorization` metadata (gRPC, with or without "Bearer "). The router keeps only their SHA-256:
a key is looked up by its digest, so no key is held, compared byte by byte, logged or echoed.

A peer that keeps failing is slowed down (`Guard`): after GUARD_FREE failures its further
failures are answered only after a doubling delay, up to GUARD_MAX_DELAY_S, so a key cannot be
guessed at line rate. Successes do not clear it: a guesser holding one good key gets no reprieve.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import time
from collections.abc import Mapping

import structlog

from roundhouse import subjects, tenancy
from roundhouse.catalogue import Catalogue
from roundhouse.errors import PermissionDenied, Unauthenticated
from router_svc import metrics

log = structlog.get_logger("router.auth")

HOW = ("send it as 'Authorization: Bearer <key>' (HTTP, and the header of a NATS job submission) "
       "or as 'authorization' metadata (gRPC)")


@dataclasses.dataclass(frozen=True)
class Tenant:
    name: str                                  # "" when the router asks for no key
    models: frozenset[str] | None              # canonical names it may call; None: every one
    limits: tenancy.Limits = tenancy.Limits()
    priority: str = subjects.NORMAL            # its requests' class (subjects.PRIORITIES)

    def may_use(self, name: str) -> bool:
        return self.models is None or name in self.models


ANYONE = Tenant("", None)


class Auth:
    """Keys to tenants, built once at the router's start (it reads `env` and `file` keys then)."""

    def __init__(self, catalogue: Catalogue, environ: Mapping[str, str] = os.environ):
        self._by_digest: dict[str, Tenant] = {}
        servable = catalogue.servable()
        for spec in catalogue.tenants:
            tenant = Tenant(spec.name, tenancy.allowed_models(spec, servable), spec.limits, spec.priority)
            for i, d in enumerate(tenancy.key_digests(spec, environ=environ)):
                other = self._by_digest.get(d)
                if other is not None and other.name != spec.name:
                    raise tenancy.TenancyError(f"tenants[{spec.name}].keys[{i}]: the same key is given to tenant {other.name}")
                self._by_digest[d] = tenant
        self.tenants = {t.name: t for t in self._by_digest.values()}
        self._guard = Guard()

    async def check(self, credential: str | None, peer: str, endpoint: str) -> Tenant:
        """`authenticate` at a front door: a refusal is counted and logged (never the key), and
        held back when `peer` keeps failing (Guard). `peer` "": not held back (NATS submissions:
        one subscription serves them in turn, so a delay would hold everyone's; NATS itself
        authenticates those clients)."""
        try:
            return self.authenticate(credential)
        except Unauthenticated as e:
            metrics.AUTH_FAILURES.labels(endpoint).inc()
            delay = self._guard.failed(peer) if peer else 0.0
            log.warning("auth.refused", endpoint=endpoint, peer=peer, reason=e.message, held_back_s=delay or None)
            if delay:
                await asyncio.sleep(delay)  # slows a key guesser down; other callers are not held
            raise

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def authenticate(self, credential: str | None) -> Tenant:
        """The tenant whose key `credential` is ("Bearer <key>" or the key alone); raises
        Unauthenticated. With no tenants configured, everyone is ANYONE."""
        if not self._by_digest:
            return ANYONE
        key = tenancy.bearer(credential)
        if not key:
            raise Unauthenticated(f"an API key is required: {HOW}")
        tenant = self._by_digest.get(tenancy.digest(key))
        if tenant is None:
            raise Unauthenticated("the API key is not valid")
        return tenant


def check_model(tenant: Tenant, name: str) -> None:
    """Raises PermissionDenied unless `tenant` may call `name` (a canonical model or adapter name)."""
    if not tenant.may_use(name):
        raise PermissionDenied(f"this API key (tenant {tenant.name}) may not use model {name}")


GUARD_FREE = 5              # failures a peer may make before it is slowed down
GUARD_FIRST_DELAY_S = 0.25
GUARD_MAX_DELAY_S = 10.0
GUARD_FORGET_S = 600.0      # a peer quiet this long starts afresh
GUARD_PEERS = 10_000        # peers remembered (the oldest are dropped)


class Guard:
    """Failed authentications by peer address, and how long to hold the next refusal back."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._failures: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()

    def failed(self, peer: str) -> float:
        """Counts a failure of `peer`; returns the seconds to wait before answering it."""
        now = self._clock()
        count, last = self._failures.pop(peer, (0, now))
        if now - last > GUARD_FORGET_S:
            count = 0
        count += 1
        self._failures[peer] = (count, now)
        while len(self._failures) > GUARD_PEERS:
            self._failures.popitem(last=False)
        if count <= GUARD_FREE:
            return 0.0
        return min(GUARD_MAX_DELAY_S, GUARD_FIRST_DELAY_S * 2 ** (count - GUARD_FREE - 1))


def peer_host(peer: str) -> str:
    """The address part of a peer ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678", "1.2.3.4")."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    return rest.rsplit(":", 1)[0].strip("[]")
