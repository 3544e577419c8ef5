"""The router's Prometheus metrics (served on its HTTP port at /metrics).

Per request, every figure is recorded once, when the request ends (`RequestClock.done`): the
token path pays one clock read per relayed event, no metric call. Gauges of what waits now are
read from the tracker at scrape time.
"""
from __future__ import annotations

import time
import weakref

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from roundhouse.metrics import LATENCY_BUCKETS, TOKEN_BUCKETS

ENDPOINTS = ("http", "grpc", "job")

REQUESTS = Counter("roundhouse_requests", "Requests by the model that served them, front door and outcome "
                   "(ok, or the error's code in lower case; cancelled: the caller left)",
                   ["model", "endpoint", "status"])
PUBLISH = Histogram("roundhouse_request_publish_seconds", "From a request's admission to JetStream's ack of its "
                    "message (validation, classification, prompt count, publish)", ["model"], buckets=LATENCY_BUCKETS)
QUEUE_WAIT = Histogram("roundhouse_request_queue_seconds", "From a request's admission to a worker starting it "
                       "(its queue, and any model load it waited for)", ["model"], buckets=LATENCY_BUCKETS)
TTFT = Histogram("roundhouse_time_to_first_token_seconds", "From a request's admission to its first generated text",
                 ["model", "endpoint"], buckets=LATENCY_BUCKETS)
ITL = Histogram("roundhouse_inter_token_latency_seconds", "Mean gap between a request's output tokens after the first, "
                "as the router relayed them (one observation per request of 2+ tokens; 0 when they came in one batch)", ["model", "endpoint"], buckets=TOKEN_BUCKETS)
E2E = Histogram("roundhouse_request_duration_seconds", "From a request's admission to its last event",
                ["model", "endpoint"], buckets=LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("roundhouse_prompt_tokens", "Prompt tokens of finished requests", ["model"])
GENERATION_TOKENS = Counter("roundhouse_generation_tokens", "Tokens generated for finished requests", ["model"])
CLASSIFIED = Counter("roundhouse_classifications", "Requests for model \"auto\" by the model chosen and the rule that "
                     "chose it (a rule's name, classifier, or fallback)", ["model", "rule"])
TENANT_REQUESTS = Counter("roundhouse_tenant_requests", "Requests by tenant and outcome (as roundhouse_requests; "
                          "tenant \"\" when the router asks for no key)", ["tenant", "status"])
TENANT_TOKENS = Counter("roundhouse_tenant_tokens", "Prompt and generated tokens charged to each tenant", ["tenant"])
RATE_LIMITED = Counter("roundhouse_rate_limited", "Requests refused because their tenant was over a limit",
                       ["tenant", "limit"])
AUTH_FAILURES = Counter("roundhouse_auth_failures", "Calls refused for a missing or unknown API key", ["endpoint"])
JOBS = Counter("roundhouse_jobs", "Async jobs submitted, and ended by state (succeeded, failed, cancelled)",
               ["model", "state"])


class _InFlight:
    """roundhouse_requests_waiting / _running per model, read from the routers' trackers at
    scrape time (in the process's event loop: the HTTP handler calls it there)."""

    def __init__(self) -> None:
        self._trackers: weakref.WeakSet = weakref.WeakSet()

    def watch(self, tracker) -> None:
        self._trackers.add(tracker)

    def collect(self):
        waiting = GaugeMetricFamily("roundhouse_requests_waiting", "Requests queued that no worker has started yet "
                                    "(this router's)", labels=["model"])
        running = GaugeMetricFamily("roundhouse_requests_running", "Requests a worker is generating (this router's)",
                                    labels=["model"])
        counts: dict[str, list[int]] = {}
        for tracker in list(self._trackers):
            for f in tracker.flights():
                if f.done:
                    continue
                c = counts.setdefault(f.model, [0, 0])
                c[0 if f.link is None else 1] += 1
        for model, (w, r) in sorted(counts.items()):
            waiting.add_metric([model], w)
            running.add_metric([model], r)
        yield waiting
        yield running


IN_FLIGHT = _InFlight()
REGISTRY.register(IN_FLIGHT)


class RequestClock:
    """One request's timestamps on its way through the gateway (time.time_ns(): also the spans'
    times), turned into metrics once it ends."""

    __slots__ = ("model", "endpoint", "tenant", "admitted_ns", "queued_ns", "loading_ns", "started_ns", "first_ns", "last_ns")

    def __init__(self, model: str, endpoint: str, admitted_ns: int, tenant: str = "") -> None:
        self.model, self.endpoint, self.tenant = model, endpoint, tenant
        self.admitted_ns = admitted_ns
        self.queued_ns = self.loading_ns = self.started_ns = self.first_ns = self.last_ns = 0

    def done(self, status: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> int:
        """Records the request's figures; returns when it ended (ns)."""
        end = time.time_ns()
        m, ep = self.model, self.endpoint
        REQUESTS.labels(m, ep, status).inc()
        TENANT_REQUESTS.labels(self.tenant, status).inc()
        if self.queued_ns:
            PUBLISH.labels(m).observe((self.queued_ns - self.admitted_ns) / 1e9)
        if self.started_ns:
            QUEUE_WAIT.labels(m).observe((self.started_ns - self.admitted_ns) / 1e9)
        if self.first_ns:
            TTFT.labels(m, ep).observe((self.first_ns - self.admitted_ns) / 1e9)
            if completion_tokens > 1:  # tokens that came in one batch reached the caller with no gap: 0, not left out
                ITL.labels(m, ep).observe((self.last_ns - self.first_ns) / 1e9 / (completion_tokens - 1))
        E2E.labels(m, ep).observe((end - self.admitted_ns) / 1e9)
        if status == "ok":
            PROMPT_TOKENS.labels(m).inc(prompt_tokens)
            GENERATION_TOKENS.labels(m).inc(completion_tokens)
        return end


def refused(model: str, endpoint: str, code: str, tenant: str = "") -> None:
    """A request refused at admission (bad input, full queue, unknown model, over a limit)."""
    REQUESTS.labels(model, endpoint, code.lower()).inc()
    TENANT_REQUESTS.labels(tenant, code.lower()).inc()
