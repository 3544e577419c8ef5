"""The router's requests in flight, and the rule that keeps each caller's stream whole.

The tracker is the one owner of every `Flight`. Workers' chunks come in through `on_chunk`;
callers read their events from `Flight.events`. A chunk says which JetStream delivery produced
it. After a worker is lost, the request is delivered again and generated again from the start;
the tracker then replays: the new generation's tokens must repeat what the caller already has
(seeded sampling makes them), and only tokens past that point go out. If they differ, the caller
gets a retryable UNAVAILABLE instead of a stream spliced from two generations.

A worker stream that breaks (the worker died, or the link between us did) is known at once, so
its flights do not wait for JetStream's redelivery timer: one that has sent the caller nothing is
queued again at once (`REQUEUE` in its events: the gateway republishes it), one that has sent
tokens fails with a retryable UNAVAILABLE that says how far it got.

A request whose message JetStream gives up on (delivered max_deliver times, never acked: the
router hears it from JetStream's MAX_DELIVERIES advisory) fails at once with a non-retryable
INTERNAL error (`gave_up`), not at its deadline: no worker gets that message again.
"""
from __future__ import annotations

import asyncio
import dataclasses
import enum
from collections.abc import Callable

from protos.v1 import common_pb2, router_pb2, worker_pb2


MAX_REQUEUES = 2   # a request re-queued after this many lost workers fails instead (it may be what kills them)

# In a flight's events: "your worker was lost before sending anything; queue the request again".
REQUEUE = object()


class Action(enum.Enum):
    OK = 0
    CANCEL = 1       # nobody waits for this request: tell the worker to abort it


@dataclasses.dataclass(eq=False)
class Flight:
    request_id: str
    model: str
    events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    delivery: int = 0                 # the JetStream delivery whose chunks are accepted
    link: object = None               # the worker stream serving the current delivery
    seq: int = 0                      # JetStream sequence of the queued message
    out_tokens: list[int] = dataclasses.field(default_factory=list)
    out_text: list[str] = dataclasses.field(default_factory=list)
    replay: "_Replay | None" = None
    done: bool = False
    requeues: int = 0                 # times a lost worker's flight was queued again
    started: bool = False             # the caller was told a worker started it
    # Set by the flight's consumer only while it waits on `events` with nothing unread: takes
    # generated text straight to the caller (sink(token_ids, text) -> True) or declines it
    # (False: the delta goes to `events` as usual). See Gateway.stream.
    sink: "Callable[[list[int], str], bool] | None" = None


@dataclasses.dataclass
class _Replay:
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""


class Delta:
    """Generated tokens and their text on their way from the tracker to a front door: a plain
    object rather than a router_pb2.GenerateEvent. Building a TokenDelta and a GenerateEvent per
    token, and reading them back field by field, was about a fifth of the router's event-loop
    samples under 32 relayed streams (py-spy `record --native`, bench_relay: upb's
    InitAttributes, Dealloc, GetAttr); only the gRPC front door needs the message (`to_event`)."""

    __slots__ = ("token_ids", "text")

    def __init__(self, token_ids: list[int], text: str) -> None:
        self.token_ids, self.text = token_ids, text

    def to_event(self) -> router_pb2.GenerateEvent:
        return router_pb2.GenerateEvent(delta=router_pb2.TokenDelta(token_ids=self.token_ids, text=self.text))

    @staticmethod
    def merged(deltas: "list[Delta]") -> "Delta":
        ids: list[int] = []
        for d in deltas:
            ids.extend(d.token_ids)
        return Delta(ids, "".join(d.text for d in deltas))


# What a flight's queue holds and the gateway yields: a Delta, or a GenerateEvent of any other kind.
Event = Delta | router_pb2.GenerateEvent


def as_event(ev: Event) -> router_pb2.GenerateEvent:
    return ev.to_event() if type(ev) is Delta else ev


def kind_of(ev: Event) -> str:
    return "delta" if type(ev) is Delta else ev.WhichOneof("event")


def _event(**kw) -> router_pb2.GenerateEvent:
    return router_pb2.GenerateEvent(**kw)


def error_event(code: str, message: str, retryable: bool) -> router_pb2.GenerateEvent:
    return _event(error=common_pb2.ErrorDetail(code=code, message=message, retryable=retryable))


class Tracker:
    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}
        self._loading: dict[str, float] = {}     # model -> load estimate (s), from the manager

    def on_model_event(self, model: str, state: int, estimate_s: float, error: str) -> None:
        """The manager says `model` is loading, ready, unloaded or cannot load."""
        waiting = [f for f in self._flights.values() if f.model == model and f.link is None and not f.done]
        if state == worker_pb2.ENGINE_STATE_LOADING:
            self._loading[model] = estimate_s
            for f in waiting:
                f.events.put_nowait(self.loading_event(model))
            return
        self._loading.pop(model, None)
        if state == worker_pb2.ENGINE_STATE_FAILED:
            for f in waiting:
                f.events.put_nowait(error_event("UNAVAILABLE", f"roundhouse: model {model} cannot be loaded: {error}", True))
                f.done = True

    def loading_event(self, model: str) -> router_pb2.GenerateEvent | None:
        if model not in self._loading:
            return None
        return _event(loading=router_pb2.Loading(model=model, estimate_s=self._loading[model]))

    def __len__(self) -> int:
        return len(self._flights)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._flights

    def flights(self) -> list[Flight]:
        """Every request in flight (a snapshot: for status and tests, not for changing them)."""
        return list(self._flights.values())

    def waiting(self, model: str) -> int:
        """This router's requests for `model` that no worker has started yet."""
        return sum(1 for f in self._flights.values() if f.model == model and f.link is None and not f.done)

    def loading_estimate(self, model: str) -> float | None:
        return self._loading.get(model)

    def open(self, request_id: str, model: str) -> Flight:
        flight = Flight(request_id, model)
        self._flights[request_id] = flight
        return flight

    def close(self, flight: Flight) -> None:
        flight.done = True
        if self._flights.get(flight.request_id) is flight:
            del self._flights[flight.request_id]

    def on_chunk(self, chunk: worker_pb2.RequestChunk, link: object) -> Action:
        f = self._flights.get(chunk.request_id)
        if f is None or f.done:
            return Action.CANCEL
        if chunk.delivery < f.delivery:
            return Action.OK  # a late chunk of an older delivery: never shown
        if chunk.delivery > f.delivery:
            # A new generation of this request. Those before it are over (a worker was lost).
            f.delivery, f.link = chunk.delivery, link
            # Nothing reached the caller yet: the new generation streams as is; else it replays.
            f.replay = _Replay() if f.out_tokens else None
        kind = chunk.WhichOneof("kind")
        if kind == "started":
            if not f.started:  # once per caller, whichever generation starts first
                f.started = True
                f.events.put_nowait(_event(started=router_pb2.Started()))
            return Action.OK
        if kind == "delta":
            return self._delta(f, chunk.delta)
        if kind == "finished":
            if f.replay is not None and len(f.replay.tokens) < len(f.out_tokens):
                return self._diverged(f)
            f.replay = None
            f.events.put_nowait(_event(finished=router_pb2.Finished(finish_reason=chunk.finished.finish_reason, usage=chunk.finished.usage)))
            f.done = True
            return Action.OK
        if kind == "error":
            f.events.put_nowait(_event(error=chunk.error))
            f.done = True
            return Action.OK
        return Action.OK

    def _delta(self, f: Flight, delta: worker_pb2.RequestDelta) -> Action:
        if f.replay is None:  # the normal case: stream it through
            ids, text = list(delta.token_ids), delta.text
            f.out_tokens.extend(ids)
            f.out_text.append(text)
            if f.sink is None or not f.sink(ids, text):
                f.events.put_nowait(Delta(ids, text))
            return Action.OK
        r = f.replay
        start = len(r.tokens)
        r.tokens.extend(delta.token_ids)
        r.text += delta.text
        common = min(len(r.tokens), len(f.out_tokens))
        if r.tokens[start:common] != f.out_tokens[start:common]:
            return self._diverged(f)
        if len(r.tokens) < len(f.out_tokens):
            return Action.OK  # still repeating what the caller has
        sent_text = "".join(f.out_text)
        if not (r.text.startswith(sent_text) or sent_text.startswith(r.text)):
            return self._diverged(f)
        new_tokens = r.tokens[len(f.out_tokens):]
        new_text = r.text[len(sent_text):]
        if len(r.text) >= len(sent_text):
            f.replay = None  # caught up: from here on chunks stream through
        if new_tokens or new_text:
            f.out_tokens.extend(new_tokens)
            f.out_text.append(new_text)
            f.events.put_nowait(Delta(new_tokens, new_text))
        return Action.OK

    def _diverged(self, f: Flight) -> Action:
        f.events.put_nowait(
            error_event(
                "UNAVAILABLE",
                "roundhouse: the worker serving this request was lost and its regeneration differs from "
                "what was already streamed; send the request again",
                True,
            )
        )
        f.done = True
        return Action.CANCEL

    def lost_link(self, link: object) -> tuple[list[Flight], list[Flight]]:
        """The worker stream `link` broke: returns (requeued, failed) among the flights it served.

        A flight the caller has seen nothing of goes back to waiting (the gateway republishes it on
        `REQUEUE`), at most MAX_REQUEUES times; one that streamed tokens cannot be continued
        without a new generation that may differ, so it fails now rather than at its deadline.
        Either way its link is dropped: the gateway's cleanup then deletes the old message from
        the stream, so JetStream does not run it again when the dead worker's ack wait ends."""
        requeued, failed = [], []
        for f in self._flights.values():
            if f.link is not link or f.done:
                continue
            f.link, f.replay = None, None
            if not f.out_tokens and f.requeues < MAX_REQUEUES:
                f.requeues += 1
                f.events.put_nowait(REQUEUE)
                requeued.append(f)
                continue
            sent = f"after {len(f.out_tokens)} tokens" if f.out_tokens else f"{f.requeues + 1} times"
            f.events.put_nowait(error_event(
                "UNAVAILABLE", f"roundhouse: the worker serving model {f.model} was lost {sent}; send the request again", True))
            f.done = True
            failed.append(f)
        return requeued, failed

    def gave_up(self, model: str, stream_seq: int, deliveries: int, request_id: str | None = None) -> Flight | None:
        """JetStream delivered message `stream_seq` of `model` `deliveries` times without an ack and
        stops there: fails the flight that queued it and returns it; None when no flight of this
        router's waits for that message (another router's, or over already). `request_id`: the
        message is a worker's hand-back copy (worker_svc/redelivery.py), whose sequence its flight
        never learns, so the flight is found by the id the message carries."""
        if request_id is None:
            f = next((f for f in self._flights.values() if f.seq == stream_seq), None)
        else:
            f = self._flights.get(request_id)
        if f is None or f.done or f.model != model:
            return None
        f.events.put_nowait(error_event(
            "INTERNAL",
            f"roundhouse: this request was delivered {deliveries} times without finishing (each worker of model "
            f"{model} that took it died or stalled running it); it is not tried again (it may be what kills them)",
            False,
        ))
        f.done = True
        return f

    def requeued(self, f: Flight) -> None:
        """The gateway queued `f` again as a new message: its deliveries count from 1 again."""
        f.delivery = 0
