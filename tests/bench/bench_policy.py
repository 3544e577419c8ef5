"""Sustainable request rate under Roundhouse's residency policy against plain LRU, simulated.

    .venv/bin/python -m tests.bench.bench_policy [--profile cpu|gpu|gpu-l2] [--duration 3600] [--seed 1]

No processes, no engines: `manager_svc.simulator` replays seeded traces (`manager_svc.sim_traces`:
bursts, diurnal, agents, long_job) on a virtual clock against the manager's real `policy.plan`
and against `simulator.lru_plan` (the seeds' LRU on demand), on identical traces. Four equal
models, a budget that holds two. The profile sets the swap costs, the service time, the engine
slots and the latency objective (SLO: arrival to end of the request); it is printed first.

For each trace it prints the sustainable rate of each policy (the highest aggregate rate, in
requests per second, at which >= 90% of requests meet the SLO: a doubling sweep from 0.05 req/s,
then six bisections; "<0.05": not even that), their ratio (Roundhouse / LRU), and, at LRU's
sustainable rate (the same trace for both), each policy's swaps per hour (evictions) and idle %
(of the time requests were waiting or running, the share in which none ran: loads, evictions,
and waits for them).
Deterministic: the same arguments print the same table. Asserts nothing.
"""
from __future__ import annotations

import argparse
import functools

from manager_svc import policy, simulator
from manager_svc.sim_traces import TRACES, Trace

TARGET = 0.9
START_RATE = 0.05


def met_at(trace: Trace, profile: simulator.Profile, plan: simulator.PlanFn, duration_s: float, seed: int,
           rate: float) -> float:
    return run(trace, profile, plan, duration_s, seed, rate).met


def run(trace: Trace, profile: simulator.Profile, plan: simulator.PlanFn, duration_s: float, seed: int,
        rate: float) -> simulator.Metrics:
    requests = trace(rate, duration_s, seed, profile.service_s)
    result = simulator.simulate(requests, simulator.config_for(profile), plan)
    return simulator.metrics(result, profile.slo_s)


def shown(rate: float) -> str:
    """A rate, or "<0.05" where even the sweep's first rate missed the target."""
    return f"{rate:.2f}" if rate else f"<{START_RATE}"


def row(name: str, trace: Trace, profile: simulator.Profile, duration_s: float, seed: int) -> str:
    rates = {}
    for label, plan in (("roundhouse", policy.plan), ("lru", simulator.lru_plan)):
        rates[label] = simulator.sustainable_rate(
            functools.partial(met_at, trace, profile, plan, duration_s, seed), START_RATE, TARGET)
    common = rates["lru"] or START_RATE
    rh = run(trace, profile, policy.plan, duration_s, seed, common)
    lru = run(trace, profile, simulator.lru_plan, duration_s, seed, common)
    ratio = rates["roundhouse"] / rates["lru"] if rates["lru"] else float("inf")
    return (f"{name:<10} {shown(rates['roundhouse']):>8} {shown(rates['lru']):>8} {ratio:>6.2f}x "
            f"{rh.swaps_per_hour:>8.0f} {lru.swaps_per_hour:>6.0f} {rh.idle_pct:>7.1f} {lru.idle_pct:>6.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=sorted(simulator.PROFILES), default="cpu")
    p.add_argument("--duration", type=float, default=3600.0, help="simulated seconds per trace")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    profile = simulator.PROFILES[a.profile]
    print(f"profile {profile.name}: {profile.note}")
    print(f"service {profile.service_s} s, max_num_seqs {profile.max_num_seqs}, SLO {profile.slo_s:.0f} s, "
          f"4 models, budget holds 2, {a.duration:.0f} s per trace, seed {a.seed}")
    print(f"{'':<10} {'sustainable req/s':>17} {'':>7} {'swaps/h @LRU rate':>17} {'idle % @LRU rate':>16}")
    print(f"{'trace':<10} {'roundh.':>8} {'lru':>8} {'ratio':>7} {'roundh.':>8} {'lru':>6} {'roundh.':>7} {'lru':>6}")
    for name, trace in TRACES.items():
        print(row(name, trace, profile, a.duration, a.seed), flush=True)


if __name__ == "__main__":
    main()
