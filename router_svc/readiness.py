"""What a router knows of each model's residency, for routing "auto" requests around models far
from serving (roundhouse.routing.prefer_resident).

Written only by the router's NATS callbacks for the manager's events (each residency change, and
the snapshot of every model the manager publishes each report interval); read by admission.
A model the manager has not spoken of yet is unknown, and an unknown model is never routed
around."""
from __future__ import annotations

from collections.abc import Mapping

from protos.v1 import manager_pb2, worker_pb2
from roundhouse.routing import Readiness


class ReadinessBook:
    def __init__(self) -> None:
        self._models: dict[str, Readiness] = {}

    def on_event(self, ev: manager_pb2.ModelEvent) -> None:
        self._models[ev.model] = Readiness(ready=ev.state == worker_pb2.ENGINE_STATE_READY, wait_s=ev.ready_in_s,
                                            queue_s=ev.queue_s)

    def on_snapshot(self, snapshot: manager_pb2.ResidencySnapshot) -> None:
        for ev in snapshot.models:
            self.on_event(ev)

    @property
    def view(self) -> Mapping[str, Readiness]:
        return self._models
