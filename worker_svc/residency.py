"""The worker's engine lifecycle: one owner, a transition table, awaitable states.

    UNLOADED -> LOADING -> READY -> EVICTING -> UNLOADED
                       +-> FAILED -> LOADING (an explicit Load retries)
    READY -> EVICTING -> SLEEPING -> LOADING (a wake; a cold start when its check fails) -> READY
             SLEEPING -> EVICTING -> UNLOADED (a sleeper stopped)
    READY -> UNLOADED, with an error: its engine died (nothing wrong with the model's files: the
             manager loads it again on demand, after a backoff)

`Residency` is the only writer of the state; every change logs one `residency.changed` event.
Callers await `ready()` instead of polling.
"""
from __future__ import annotations

import asyncio
import enum

import structlog

from protos.v1 import worker_pb2

log = structlog.get_logger("worker.residency")


class State(enum.Enum):
    UNLOADED = worker_pb2.ENGINE_STATE_UNLOADED
    LOADING = worker_pb2.ENGINE_STATE_LOADING
    READY = worker_pb2.ENGINE_STATE_READY
    EVICTING = worker_pb2.ENGINE_STATE_EVICTING
    FAILED = worker_pb2.ENGINE_STATE_FAILED
    SLEEPING = worker_pb2.ENGINE_STATE_SLEEPING


_ALLOWED: dict[State, frozenset[State]] = {
    State.UNLOADED: frozenset({State.LOADING}),
    State.LOADING: frozenset({State.READY, State.FAILED}),
    State.READY: frozenset({State.EVICTING, State.FAILED, State.UNLOADED}),
    State.EVICTING: frozenset({State.UNLOADED, State.FAILED, State.SLEEPING}),
    State.FAILED: frozenset({State.LOADING, State.UNLOADED}),
    State.SLEEPING: frozenset({State.LOADING, State.EVICTING}),
}


class IllegalTransition(RuntimeError):
    pass


class Residency:
    def __init__(self, model: str):
        self.model = model
        self.state = State.UNLOADED
        self.error = ""
        self.seq = 0          # state changes so far: orders this worker's reports and answers
        self._changed = asyncio.Condition()

    async def set(self, new: State, error: str = "") -> None:
        old = self.state
        if new not in _ALLOWED[old]:
            raise IllegalTransition(f"roundhouse: {old.name} -> {new.name} is not allowed")
        self.state, self.error = new, error
        self.seq += 1
        log.info("residency.changed", model=self.model, old=old.name, new=new.name, **({"error": error} if error else {}))
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, *states: State) -> State:
        async with self._changed:
            await self._changed.wait_for(lambda: self.state in states)
        return self.state

    async def next_change(self, timeout: float) -> None:
        """Returns at the next state change, or after `timeout` seconds."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass

    async def ready(self) -> None:
        await self.wait_for(State.READY)
