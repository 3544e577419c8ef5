"""The worker's Prometheus metrics (its --metrics-port), next to vLLM's own `vllm:*` engine
metrics, which its engine registers in the same global registry (worker_svc.engine).

Counts move once per request, when it is taken and when it is settled; the token path records
nothing. Gauges of the engine's state and slots are read from the worker at scrape time (on the
scrape's thread: plain reads of values the event loop writes).
"""
from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from roundhouse.metrics import LATENCY_BUCKETS
from worker_svc.residency import State

REQUESTS = Counter("roundhouse_worker_requests", "Requests this worker settled with JetStream, by how: ack (done), "
                   "term (nobody waits: cancelled, deadline, given up), retry (its engine died running it alone), "
                   "hand_back (not its fault: queued again), suspect (its engine died running it among others), "
                   "adopted (a redelivery of one it still runs)",
                   ["model", "outcome"])
REDELIVERIES = Counter("roundhouse_worker_redeliveries", "Requests taken that had been delivered before "
                       "(a worker lost, stalled or handed them back)", ["model"])
NAKS = Counter("roundhouse_worker_naks", "Hand-backs done as a JetStream nak (publishing a copy failed)", ["model"])
QUEUE_WAIT = Histogram("roundhouse_worker_queue_wait_seconds", "From a request's storing in JetStream to this "
                       "worker taking it", ["model"], buckets=LATENCY_BUCKETS)
ENGINE_TTFT = Histogram("roundhouse_worker_time_to_first_token_seconds", "From handing a request to the engine to "
                        "its first output (scheduling and prefill)", ["model"], buckets=LATENCY_BUCKETS)
STATES = tuple(s.name.lower() for s in State)


class _WorkerGauges:
    def __init__(self) -> None:
        self._worker = None

    def watch(self, worker) -> None:
        self._worker = worker

    def collect(self):
        state = GaugeMetricFamily("roundhouse_worker_engine_state", "1 for the engine's current state, 0 for the others",
                                  labels=["model", "state"])
        running = GaugeMetricFamily("roundhouse_worker_requests_running", "Requests in the engine now", labels=["model"])
        free = GaugeMetricFamily("roundhouse_worker_slots_free", "Requests the engine could take now (max_num_seqs "
                                 "less those running)", labels=["model"])
        loads = GaugeMetricFamily("roundhouse_worker_last_load_seconds", "How long its last load took", labels=["model"])
        w = self._worker
        if w is not None:
            now = w.residency.state.name.lower()
            for s in STATES:
                state.add_metric([w.model, s], 1.0 if s == now else 0.0)
            running.add_metric([w.model], len(w.active))
            free.add_metric([w.model], max(0, w.free_slots()))
            loads.add_metric([w.model], w.counters.load_seconds)
        yield from (state, running, free, loads)


GAUGES = _WorkerGauges()
REGISTRY.register(GAUGES)
