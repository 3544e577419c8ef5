"""The manager's Prometheus metrics (its --metrics-port).

What each model is now (state, tier, queue, backoff) and what each GPU holds are read from the
manager's entries at scrape time: the decide loop stays their one writer, the scrape's thread
only reads. Loads, wakes, evictions and failures are counted where the decide loop applies them.
"""
from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from manager_svc.policy import RESIDENT, Phase, used_bytes
from roundhouse.metrics import TRANSITION_BUCKETS
from roundhouse.subjects import PRIORITIES

LOADS = Counter("roundhouse_model_loads", "Models brought to serve, by how (load: a cold start; wake: from sleep) "
                "and why (demand: requests queued; pinned; admin: roundhouse load)", ["model", "kind", "reason"])
LOAD_SECONDS = Histogram("roundhouse_model_load_seconds", "From a load or wake's start to its model serving",
                         ["model", "kind"], buckets=TRANSITION_BUCKETS)
EVICTIONS = Counter("roundhouse_model_evictions", "Evictions, by what the engine became (stop, sleep1, sleep2) and "
                    "why (policy: for another model or idle; admin: roundhouse evict; drain)", ["model", "to", "reason"])
EVICTION_SECONDS = Histogram("roundhouse_model_eviction_seconds", "From an eviction's start (drain included) to its end",
                             ["model", "to"], buckets=TRANSITION_BUCKETS)
FAILURES = Counter("roundhouse_model_load_failures", "Loads that failed or were refused, and engines that died or "
                   "workers that were lost, by reason (failed, refused, engine_died, worker_lost, interrupted)",
                   ["model", "reason"])

# roundhouse_model_tier: where a model's engine is, as one number a dashboard can chart.
TIER_GPU, TIER_ASLEEP, TIER_NONE = 2, 1, 0


def tier_of(phase: Phase) -> int:
    if phase in RESIDENT:
        return TIER_GPU
    return TIER_ASLEEP if phase is Phase.SLEEPING else TIER_NONE


class _ManagerGauges:
    def __init__(self) -> None:
        self._manager = None

    def watch(self, manager) -> None:
        self._manager = manager

    def collect(self):
        state = GaugeMetricFamily("roundhouse_model_state", "1 for the model's current state, 0 for the others",
                                  labels=["model", "state"])
        tier = GaugeMetricFamily("roundhouse_model_tier", "Where its engine is: 2 on the GPU (loading, ready or being "
                                 "evicted), 1 asleep, 0 not loaded", labels=["model"])
        sleep = GaugeMetricFamily("roundhouse_model_sleep_level", "Its sleep level while asleep (1: weights in host "
                                  "RAM, 2: discarded), else 0", labels=["model"])
        pinned = GaugeMetricFamily("roundhouse_model_pinned", "1 while pinned resident", labels=["model"])
        queue = GaugeMetricFamily("roundhouse_model_queue_depth", "Requests queued for it that no worker took yet, as "
                                  "the manager last read its queue", labels=["model"])
        by_class = GaugeMetricFamily("roundhouse_model_queue_depth_by_priority", "Of its queue depth, the requests of "
                                     "each tenant priority class (high, normal, low)", labels=["model", "priority"])
        in_flight = GaugeMetricFamily("roundhouse_model_requests_in_flight", "Requests its worker holds",
                                      labels=["model"])
        backoff = GaugeMetricFamily("roundhouse_model_backoff_seconds", "Seconds until a failed or dead model may "
                                    "load again", labels=["model"])
        footprint = GaugeMetricFamily("roundhouse_model_footprint_bytes", "GPU memory it takes when resident "
                                      "(weights, KV cache, engine overhead)", labels=["model", "gpu"])
        budget = GaugeMetricFamily("roundhouse_gpu_budget_bytes", "Memory the manager may fill on each GPU",
                                   labels=["gpu"])
        used = GaugeMetricFamily("roundhouse_gpu_used_bytes", "Memory the models loading, resident or asleep hold on "
                                 "each GPU", labels=["gpu"])
        m = self._manager
        if m is not None:
            now = m.now()
            entries = list(m.entries.values())
            views = [e.view(now) for e in entries]
            for e in entries:
                name = e.spec.name
                for p in Phase:
                    state.add_metric([name, p.value], 1.0 if p is e.phase else 0.0)
                tier.add_metric([name], tier_of(e.phase))
                sleep.add_metric([name], e.tier)
                pinned.add_metric([name], 1.0 if e.pinned else 0.0)
                queue.add_metric([name], e.queue_depth)
                for priority, n in zip(PRIORITIES, e.lanes.pending if e.lanes is not None else (0,) * len(PRIORITIES)):
                    by_class.add_metric([name, priority], n)
                in_flight.add_metric([name], e.in_flight)
                backoff.add_metric([name], max(0.0, e.backoff_until - now))
                footprint.add_metric([name, e.spec.gpu], e.footprint)
            for gpu, b in m.budgets.items():
                budget.add_metric([gpu], b)
                used.add_metric([gpu], used_bytes(views, gpu))
        yield from (state, tier, sleep, pinned, queue, by_class, in_flight, backoff, footprint, budget, used)


GAUGES = _ManagerGauges()
REGISTRY.register(GAUGES)
