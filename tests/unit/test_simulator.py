"""Table tests of the residency simulator and its traces (pure code: no processes, no clock)."""
import math

import pytest

from manager_svc import policy, sim_traces
from manager_svc.simulator import (
    PROFILES, Request, SimConfig, SimModel, SwapCosts, config_for, lru_plan, metrics, requests_of, simulate,
    sustainable_rate,
)

pytestmark = pytest.mark.unit

COSTS = SwapCosts(cold_load_s=27.0, warm_load_s=14.0, evict_s=0.7)
POLICIES = [("roundhouse", policy.plan), ("lru", lru_plan)]
POLICY_IDS = [p[0] for p in POLICIES]


def cfg(names="abc", budget=2, **kw) -> SimConfig:
    models = kw.pop("models", None) or tuple(SimModel(n, max_num_seqs=4) for n in names)
    return SimConfig(models=models, budget=budget, costs=COSTS, **kw)


def alternating(pattern: str, rounds: int, gap_s: float = 1.0, service_s: float = 5.0) -> list[Request]:
    """`pattern` (e.g. "abaac") repeated `rounds` times, one request every `gap_s`."""
    return requests_of(((i * gap_s, m) for i, m in enumerate(pattern * rounds)), service_s)


TRACE_CASES = [(t, p) for t in sim_traces.TRACES for p in POLICY_IDS]


def traced(trace_name: str, policy_name: str):
    requests = sim_traces.TRACES[trace_name](0.5, 600.0, 7, 2.0)
    result = simulate(requests, cfg("abcd"), dict(POLICIES)[policy_name])
    return requests, result


# ---- invariants, on every trace and both policies ---------------------------------------------


@pytest.mark.parametrize("trace_name, policy_name", TRACE_CASES)
def test_every_request_ends_exactly_once(trace_name, policy_name):
    requests, result = traced(trace_name, policy_name)
    assert [o.request.id for o in result.outcomes] == [r.id for r in requests]
    assert all(o.served and o.starts >= 1 for o in result.outcomes)
    assert all(o.end >= o.request.arrival + o.request.service_s for o in result.outcomes)


@pytest.mark.parametrize("trace_name, policy_name", TRACE_CASES)
def test_the_virtual_clock_never_goes_back(trace_name, policy_name):
    _, result = traced(trace_name, policy_name)
    assert result.clock and all(a <= b for a, b in zip(result.clock, result.clock[1:]))
    assert all(a.time <= b.time for a, b in zip(result.transitions, result.transitions[1:]))


@pytest.mark.parametrize("trace_name, policy_name", TRACE_CASES)
def test_one_transition_at_a_time_and_never_over_budget(trace_name, policy_name):
    _, result = traced(trace_name, policy_name)
    loading, resident = None, set()
    for t in result.transitions:
        if t.kind == "load":
            assert loading is None, f"{t.model} loads while {loading} does"
            loading = t.model
            resident.add(t.model)
            assert len(resident) <= 2
        elif t.kind == "ready":
            loading = None
        elif t.kind == "unloaded":
            resident.discard(t.model)


@pytest.mark.parametrize("policy_name", POLICY_IDS)
def test_a_pinned_model_is_never_evicted(policy_name):
    models = (SimModel("a", max_num_seqs=4, pinned=True), *(SimModel(n, max_num_seqs=4) for n in "bcd"))
    requests = sim_traces.agents(1.0, 600.0, 3, 2.0)
    result = simulate(requests, cfg(models=models, resident_at_start=("a",)), dict(POLICIES)[policy_name])
    assert result.count("evict", "a") == 0 and result.count("load", "a") == 0
    assert result.count("evict") > 0  # the others did swap


# ---- behaviour ---------------------------------------------------------------------------------

SWAP_CASES = [
    # (name, pattern, rounds, gap_s, roundhouse evictions, lru evictions)
    ("single model never swaps", "a", 40, 1.0, 0, 0),
    ("two models fit: no swap", "ab", 40, 1.0, 0, 0),
    ("A B A A C: roundhouse waits for busy models, LRU evicts them", "abaac", 20, 1.0, 3, 5),
]


@pytest.mark.parametrize("name, pattern, rounds, gap_s, rh_evictions, lru_evictions", SWAP_CASES,
                         ids=[c[0] for c in SWAP_CASES])
def test_swaps(name, pattern, rounds, gap_s, rh_evictions, lru_evictions):
    requests = alternating(pattern, rounds, gap_s)
    rh = simulate(requests, cfg())
    lru = simulate(requests, cfg(), lru_plan)
    assert (rh.count("evict"), lru.count("evict")) == (rh_evictions, lru_evictions)
    assert all(o.served for o in rh.outcomes + lru.outcomes)


def test_roundhouse_swaps_fewer_times_than_lru_on_agents():
    requests = sim_traces.agents(0.5, 1200.0, 11, 2.0)
    assert simulate(requests, cfg("abcd")).count("evict") < simulate(requests, cfg("abcd"), lru_plan).count("evict")


LATENCY_CASES = [
    # (name, config, expected latency of the one request)
    ("a cold load", cfg(loaded_before=False), 27.0 + 2.0),
    ("a model loaded before reloads", cfg(), 14.0 + 2.0),
    ("already resident", cfg(resident_at_start=("a",)), 2.0),
]


@pytest.mark.parametrize("name, config, latency", LATENCY_CASES, ids=[c[0] for c in LATENCY_CASES])
def test_load_costs(name, config, latency):
    (outcome,) = simulate([Request(0, "a", 5.0, 2.0)], config).outcomes
    assert outcome.latency == pytest.approx(latency)


def test_roundhouse_honours_min_resident_time():
    requests = alternating("abc", 30, gap_s=2.0, service_s=0.5)
    result = simulate(requests, cfg())
    ready_at = {}
    for t in result.transitions:
        if t.kind == "ready":
            ready_at[t.model] = t.time
        elif t.kind == "evict":
            assert t.time - ready_at[t.model] >= 30.0, t


def test_lru_drains_a_busy_model_and_requeues_what_outlives_the_drain():
    requests = [Request(0, "a", 0.0, 100.0), Request(1, "b", 1.0, 1.0)]
    result = simulate(requests, cfg(budget=1, resident_at_start=("a",)), lru_plan)
    long, short = result.outcomes
    assert long.served and long.starts == 2           # cut by the 30 s drain, run again after b
    assert short.latency == pytest.approx(30.0 + 0.7 + 14.0 + 1.0)


def test_a_model_larger_than_the_budget_fails_its_requests():
    models = (SimModel("a", footprint=3),)
    result = simulate([Request(0, "a", 0.0, 1.0), Request(1, "a", 5.0, 1.0)], cfg(models=models))
    assert [o.served for o in result.outcomes] == [False, False]
    assert result.count("fail") == 2


def test_requests_never_served_are_given_up_once():
    models = (SimModel("a", pinned=True), SimModel("b"))
    requests = [Request(0, "b", 0.0, 1.0)]  # a is pinned: b never fits
    result = simulate(requests, cfg(models=models, budget=1, resident_at_start=("a",), give_up_s=50.0))
    (o,) = result.outcomes
    assert not o.served and o.end == pytest.approx(50.0)


# ---- traces and metrics ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(sim_traces.TRACES))
def test_traces_are_seeded_and_near_their_rate(name):
    trace = sim_traces.TRACES[name]
    one, again, other = trace(2.0, 1800.0, 5, 1.0), trace(2.0, 1800.0, 5, 1.0), trace(2.0, 1800.0, 6, 1.0)
    assert one == again and one != other
    assert len(one) == pytest.approx(2.0 * 1800, rel=0.15)
    assert {r.model for r in one} == set(sim_traces.MODELS)
    assert [r.arrival for r in one] == sorted(r.arrival for r in one) and all(0 <= r.arrival < 1800 for r in one)


def test_metrics():
    requests = alternating("a", 10, gap_s=1.0, service_s=2.0)
    result = simulate(requests, cfg("a", budget=1))
    m = metrics(result, slo_s=15.5)
    # loaded at 14 s; 4 slots: requests 0-3 end at 16 s, 4-7 at 18 s, 8-9 at 20 s; only request 0 takes > 15.5 s
    assert [o.end for o in result.outcomes] == [16.0] * 4 + [18.0] * 4 + [20.0] * 2
    assert (m.requests, m.met, m.swaps_per_hour) == (10, 0.9, 0.0)
    assert m.idle_pct == pytest.approx(100 * 14.0 / 20.0)   # requests waited 20 s, none ran for the first 14


@pytest.mark.parametrize("limit", [0.3, 3.0, 40.0])
def test_sustainable_rate_finds_a_threshold(limit):
    found = sustainable_rate(lambda rate: 1.0 if rate <= limit else 0.5, start=0.05)
    assert found <= limit and found == pytest.approx(limit, rel=2 ** (1 / 64) - 1 + 1e-9)


def test_sustainable_rate_is_zero_when_nothing_passes():
    assert sustainable_rate(lambda rate: 0.0, start=0.05) == 0.0


@pytest.mark.parametrize("profile", list(PROFILES))
def test_profiles_build_configs(profile):
    c = config_for(PROFILES[profile])
    assert c.budget == 2 and len(c.models) == 4 and math.isfinite(c.costs.warm_load_s)
