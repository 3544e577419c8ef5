"""Tenants' limits, held across every router: counters in a NATS KV bucket, changed by compare-and-set.

Keys of bucket `rh-limits` (an entry goes 2 days after its last write):

    <tenant>.m.<unix minute>   {"r": requests admitted, "t": tokens charged} in that UTC minute
    <tenant>.d.<unix day>      {"t": tokens charged} that UTC day
    <tenant>.c                 {"<router id>": [requests in flight, lease end (unix s)], ...}

Requests and tokens per minute use a sliding window, estimated from this minute's count and the
last one's, weighted by how much of it the window still covers (the estimate nginx and
Cloudflare use; `estimate`). A request is counted by a compare-and-set of this minute's entry,
retried when another router changed it meanwhile: three routers admit one limit, exactly.
Tokens (prompt + generated) are known only when a request ends, and charged then: admission
refuses a tenant whose count has reached its limit, so requests admitted together can overrun
it by what they generate (OpenAI's token limits behave the same). Waiting for a model to load
costs nothing: only tokens count, and a request that never started is charged none.

Concurrency: each router writes its own count of the tenant's requests in flight into the
tenant's entry, with a lease it renews while it has any (LEASE_S); admission sums the entries
whose lease holds. A router that dies stops counting when its lease ends; one that restarts is a
new router id. Every count lives in NATS, so a router restart loses none.

The decisions (`estimate`, `seconds_until_room`, `decide`) are pure; `Limiter` does the I/O.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid

import nats.errors
import nats.js.errors
import structlog
from nats.js.api import KeyValueConfig, StorageType

from roundhouse import tasks
from roundhouse.errors import RateLimited, Unavailable
from router_svc import metrics
from router_svc.auth import Tenant

log = structlog.get_logger("router.limits")

BUCKET = "rh-limits"
KEEP_S = 2 * 86400
LEASE_S = 30.0
MINUTE, DAY = 60, 86400
CAS_TRIES = 50


def estimate(current: float, previous: float, elapsed_s: float, window_s: float = MINUTE) -> float:
    """The count over the last `window_s` seconds, `elapsed_s` into the current window."""
    return current + previous * max(0.0, 1.0 - elapsed_s / window_s)


def seconds_until_room(current: float, previous: float, elapsed_s: float, limit: float, need: float = 1.0,
                       window_s: float = MINUTE) -> float:
    """How long until `estimate(...) + need <= limit`, if nothing more arrives (0: now)."""
    if estimate(current, previous, elapsed_s, window_s) + need <= limit:
        return 0.0
    room = limit - need
    if current <= room:  # this window alone fits: wait for the last one's weight to shrink
        return max(0.0, (1.0 - (room - current) / previous) * window_s - elapsed_s)
    # This window alone is over: it must become the last one and shrink in turn.
    return (window_s - elapsed_s) + max(0.0, (1.0 - room / current) * window_s)


@dataclasses.dataclass(frozen=True)
class Counts:
    """What the bucket holds for one tenant, now."""
    requests: int = 0            # this minute
    requests_before: int = 0     # the minute before
    tokens: int = 0              # this minute
    tokens_before: int = 0
    tokens_today: int = 0
    in_flight: int = 0           # across routers, leases that hold


@dataclasses.dataclass(frozen=True)
class Refusal:
    limit: str                   # requests_per_minute, tokens_per_minute, tokens_per_day, concurrent_requests
    message: str
    retry_after_s: float


def decide(tenant: Tenant, counts: Counts, now: float) -> Refusal | None:
    """Whether one more request of `tenant` may start now; why not, and when to try again."""
    lim = tenant.limits
    elapsed = now % MINUTE
    if lim.concurrent_requests is not None and counts.in_flight >= lim.concurrent_requests:
        return Refusal("concurrent_requests", f"tenant {tenant.name} has {counts.in_flight} requests in flight, its limit "
                                              f"is {lim.concurrent_requests}", 1.0)
    if lim.requests_per_minute is not None:
        wait = seconds_until_room(counts.requests, counts.requests_before, elapsed, lim.requests_per_minute)
        if wait > 0:
            return Refusal("requests_per_minute", f"tenant {tenant.name} is over its limit of {lim.requests_per_minute} "
                                                  "requests per minute", wait)
    if lim.tokens_per_minute is not None:
        wait = seconds_until_room(counts.tokens, counts.tokens_before, elapsed, lim.tokens_per_minute)
        if wait > 0:
            return Refusal("tokens_per_minute", f"tenant {tenant.name} is over its limit of {lim.tokens_per_minute} "
                                                "tokens per minute", wait)
    if lim.tokens_per_day is not None and counts.tokens_today >= lim.tokens_per_day:
        return Refusal("tokens_per_day", f"tenant {tenant.name} has used its {lim.tokens_per_day} tokens for today "
                                         "(UTC)", DAY - now % DAY)
    return None


@dataclasses.dataclass
class Lease:
    """One admitted request's hold on its tenant's limits; given back by `Limiter.release`."""
    tenant: Tenant
    concurrent: bool


def _keys(tenant: str, now: float) -> tuple[str, str, str, str]:
    minute, day = int(now // MINUTE), int(now // DAY)
    return f"{tenant}.m.{minute}", f"{tenant}.m.{minute - 1}", f"{tenant}.d.{day}", f"{tenant}.c"


class Limiter:
    """The router's side of the shared counters. Tenants with no limits cost nothing here."""

    def __init__(self, js, clock=time.time):
        self._js = js
        self._clock = clock
        self._kv = None
        self.router_id = uuid.uuid4().hex[:12]
        self._in_flight: dict[str, int] = {}      # this router's requests in flight, by tenant (loop only)
        self._tasks: set[asyncio.Task] = set()
        self._renewer: asyncio.Task | None = None

    async def start(self) -> None:
        try:
            self._kv = await self._js.key_value(BUCKET)
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
            self._kv = await self._js.create_key_value(KeyValueConfig(
                bucket=BUCKET, history=1, ttl=KEEP_S, storage=StorageType.FILE,
                description="roundhouse: tenants' request and token counts (router_svc/limits.py)"))
        self._renewer = asyncio.create_task(self._renew(), name="limits-renew")

    async def stop(self) -> None:
        if self._renewer is not None:
            await tasks.cancel_all([self._renewer])   # its KV writes go through wait_for (roundhouse.tasks)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for tenant in [t for t, n in self._in_flight.items() if n]:
            self._in_flight[tenant] = 0
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError, RuntimeError):
                await self._write_own(tenant)

    async def acquire(self, tenant: Tenant) -> Lease | None:
        """Counts one request of `tenant` against its limits, or raises RateLimited (429 /
        RESOURCE_EXHAUSTED, with when to retry). None: the tenant has no limits."""
        lim = tenant.limits
        if not lim.any:
            return None
        try:
            await self._acquire(tenant)
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            raise Unavailable(f"the limits store is unavailable ({type(e).__name__}); retry") from None
        return Lease(tenant, lim.concurrent_requests is not None)

    async def _acquire(self, tenant: Tenant) -> None:
        lim = tenant.limits
        for _ in range(CAS_TRIES):
            now = self._clock()
            minute, before, day, conc = _keys(tenant.name, now)
            cur, prev, today, flight = await asyncio.gather(
                self._get(minute) if lim.requests_per_minute or lim.tokens_per_minute else _none(),
                self._get(before) if lim.requests_per_minute or lim.tokens_per_minute else _none(),
                self._get(day) if lim.tokens_per_day else _none(),
                self._get(conc) if lim.concurrent_requests else _none())
            counts = Counts(
                requests=cur[0].get("r", 0), requests_before=prev[0].get("r", 0),
                tokens=cur[0].get("t", 0), tokens_before=prev[0].get("t", 0), tokens_today=today[0].get("t", 0),
                in_flight=self._live(flight[0], now, tenant.name))
            refusal = decide(tenant, counts, now)
            if refusal is not None:
                metrics.RATE_LIMITED.labels(tenant.name, refusal.limit).inc()
                raise RateLimited(refusal.limit, refusal.message, refusal.retry_after_s)
            if lim.requests_per_minute is not None:
                value = dict(cur[0], r=counts.requests + 1)
                if not await self._cas(minute, value, cur[1]):
                    continue  # another router counted one meanwhile: look again
            break
        else:
            raise Unavailable(f"tenant {tenant.name}'s counters changed {CAS_TRIES} times while being read; retry")
        if lim.concurrent_requests is not None:
            # Counted in this router's own entry (only this router writes it), written in the
            # background (the request need not wait for it: this router's own count is local):
            # the check above read every router's; routers admitting within the same few
            # milliseconds can overrun the limit by one each.
            self._in_flight[tenant.name] = self._in_flight.get(tenant.name, 0) + 1
            self._background(self._write_own_quietly(tenant.name))

    def release(self, lease: Lease | None, tokens: int) -> None:
        """The request is over: gives back its slot and charges `tokens`. Runs in the background
        (a caller's cancellation must not lose a count); `stop` waits for what is pending."""
        if lease is None:
            return
        self._background(self._release(lease, tokens))

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_own_quietly(self, tenant: str) -> None:
        try:
            await self._write_own(tenant)
        except (nats.errors.Error, asyncio.TimeoutError) as e:  # the renewer writes it again within LEASE_S / 3
            log.warning("limits.write_failed", tenant=tenant, error=repr(e))

    async def _release(self, lease: Lease, tokens: int) -> None:
        name, lim = lease.tenant.name, lease.tenant.limits
        try:
            if lease.concurrent:
                self._in_flight[name] = max(0, self._in_flight.get(name, 0) - 1)
                await self._write_own(name)
            if tokens > 0:
                minute, _, day, _ = _keys(name, self._clock())
                if lim.tokens_per_minute is not None or lim.requests_per_minute is not None:
                    await self._add(minute, "t", tokens)
                if lim.tokens_per_day is not None:
                    await self._add(day, "t", tokens)
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            log.warning("limits.release_failed", tenant=name, tokens=tokens, error=repr(e))

    async def _add(self, key: str, field: str, amount: int) -> None:
        for _ in range(CAS_TRIES):
            value, revision = await self._get(key)
            if await self._cas(key, dict(value, **{field: value.get(field, 0) + amount}), revision):
                return
        log.warning("limits.charge_lost", key=key, amount=amount)

    async def _write_own(self, tenant: str) -> None:
        """This router's entry in `tenant`'s concurrency key: its count, with a fresh lease."""
        key = f"{tenant}.c"
        for _ in range(CAS_TRIES):
            value, revision = await self._get(key)
            now = self._clock()
            value = {r: v for r, v in value.items() if v[1] > now and r != self.router_id}
            n = self._in_flight.get(tenant, 0)
            if n:
                value[self.router_id] = [n, now + LEASE_S]
            if await self._cas(key, value, revision):
                return

    def _live(self, entry: dict, now: float, tenant: str) -> int:
        """Requests of `tenant` in flight across routers: the others' live leases, and this
        router's own count (fresher than what it last wrote)."""
        others = sum(n for r, (n, until) in entry.items() if until > now and r != self.router_id)
        return others + self._in_flight.get(tenant, 0)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(LEASE_S / 3)
            for tenant in [t for t, n in self._in_flight.items() if n]:
                with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                    await self._write_own(tenant)

    async def _get(self, key: str) -> tuple[dict, int]:
        """(value, revision); ({}, 0) when the key does not exist."""
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return {}, 0
        return json.loads(entry.value or b"{}"), entry.revision

    async def _cas(self, key: str, value: dict, revision: int) -> bool:
        data = json.dumps(value, separators=(",", ":")).encode()
        try:
            if revision:
                await self._kv.update(key, data, last=revision)
            else:
                await self._kv.create(key, data)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True


async def _none() -> tuple[dict, int]:
    return {}, 0


def tokens_of(prompt: int, completion: int, started: bool) -> int:
    """What a request is charged: its prompt and generated tokens, nothing if it never started."""
    return (prompt + completion) if started else 0

