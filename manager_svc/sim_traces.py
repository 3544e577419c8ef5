"""Seeded request traces for the residency simulator (`manager_svc.simulator`).

Each generator takes the mean aggregate rate (requests per second over the whole trace), the
trace's length, a seed and the models, and returns `Request`s in arrival order, every request
with the same service time. The same arguments give the same trace, on any machine. Traces are
open-loop: arrivals do not depend on how fast earlier requests were served, so every policy
replays exactly the same requests.

  bursts    each period (exponential, mean `burst_s`) one model is hot and takes `hot_share` of
            the traffic, the others share the rest; the hot one changes every period;
  diurnal   every model follows its own day (a sine over the trace, a 0.8 swing), the days
            shifted so the models peak in turn, like users in different time zones;
  agents    agent sessions start at random (Poisson); each makes about `calls` calls, a few
            seconds apart, to a home model and the tools it consults: A B A A C ...;
  long_job  a batch job keeps one model busy over the middle half of the trace (`job_share` of
            all the traffic) while interactive requests arrive for every model.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from manager_svc.simulator import Request, requests_of

MODELS: tuple[str, ...] = ("a", "b", "c", "d")
Trace = Callable[..., list[Request]]


def poisson_times(rng: random.Random, rate: float, start: float, end: float) -> list[float]:
    """Arrival times of a Poisson process of `rate` per second over [start, end)."""
    times, t = [], start
    if rate <= 0:
        return times
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            return times
        times.append(t)


def bursts(rate: float, duration_s: float, seed: int, service_s: float, models: Sequence[str] = MODELS,
           burst_s: float = 60.0, hot_share: float = 0.8) -> list[Request]:
    rng = random.Random(seed)
    pairs, t, hot = [], 0.0, rng.choice(models)
    while t < duration_s:
        end = min(duration_s, t + rng.expovariate(1.0 / burst_s))
        for at in poisson_times(rng, rate, t, end):
            cold = [m for m in models if m != hot]
            pairs.append((at, hot if rng.random() < hot_share or not cold else rng.choice(cold)))
        hot = rng.choice([m for m in models if m != hot] or list(models))
        t = end
    return requests_of(pairs, service_s)


def diurnal(rate: float, duration_s: float, seed: int, service_s: float, models: Sequence[str] = MODELS,
            swing: float = 0.8) -> list[Request]:
    """Each model's rate is rate/n * (1 + swing * sin(2 pi (t / duration - i / n))): drawn by thinning."""
    rng = random.Random(seed)
    n = len(models)
    per_model = rate / n
    pairs = []
    for i, model in enumerate(models):
        for at in poisson_times(rng, per_model * (1 + swing), 0.0, duration_s):
            level = 1 + swing * math.sin(2 * math.pi * (at / duration_s - i / n))
            if rng.random() * (1 + swing) < level:
                pairs.append((at, model))
    return requests_of(pairs, service_s)


def agents(rate: float, duration_s: float, seed: int, service_s: float, models: Sequence[str] = MODELS,
           calls: float = 10.0, gap_s: float = 3.0, stay: float = 0.5) -> list[Request]:
    """Sessions start at rate / calls per second; a session's next call goes to its home model
    with probability `stay`, else to another model at random; `gap_s` (exponential) between calls."""
    rng = random.Random(seed)
    pairs = []
    for start in poisson_times(rng, rate / calls, 0.0, duration_s):
        home = rng.choice(models)
        at, model = start, home
        while at < duration_s:
            pairs.append((at, model))
            if rng.random() < 1.0 / calls:
                break
            others = [m for m in models if m != home]
            model = home if rng.random() < stay or not others else rng.choice(others)
            at += rng.expovariate(1.0 / gap_s)
    return requests_of(pairs, service_s)


def long_job(rate: float, duration_s: float, seed: int, service_s: float, models: Sequence[str] = MODELS,
             job_share: float = 0.5) -> list[Request]:
    """The job (on the first model) runs over [duration/4, 3 duration/4) at 2 * job_share * rate;
    interactive requests, (1 - job_share) * rate, go to all the models alike."""
    rng = random.Random(seed)
    pairs = [(at, rng.choice(models)) for at in poisson_times(rng, (1 - job_share) * rate, 0.0, duration_s)]
    pairs += [(at, models[0]) for at in poisson_times(rng, 2 * job_share * rate, duration_s / 4, 3 * duration_s / 4)]
    return requests_of(pairs, service_s)


TRACES: dict[str, Trace] = {"bursts": bursts, "diurnal": diurnal, "agents": agents, "long_job": long_job}
