"""NATS names: the one place a model name becomes a subject token.

Model names contain '/' and '.' (`Qwen/Qwen2.5-0.5B`); in a subject '.' separates tokens and
'*' / '>' are wildcards. A name becomes a readable slug plus a short hash of the exact name, so
two names that slug alike (`a/b` and `a.b`) still get different subjects.
"""
from __future__ import annotations

import hashlib
import re

STREAM = "RH_REQUESTS"
SUBJECT_PREFIX = "rh.req"
STREAM_SUBJECTS = [f"{SUBJECT_PREFIX}.>"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def model_token(model: str) -> str:
    """A subject token (and consumer name) that is safe, stable and unique for `model`."""
    if not model:
        raise ValueError("model name must not be empty")
    slug = _UNSAFE.sub("_", model).strip("_")[:48] or "model"
    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"{slug}-{digest}"


def request_subject(model: str) -> str:
    return f"{SUBJECT_PREFIX}.{model_token(model)}"


def consumer_name(model: str) -> str:
    """The durable pull consumer shared by every worker of `model`."""
    return f"rh-worker-{model_token(model)}"


# Core NATS (not JetStream): events that may be lost without harm.
REQUEST_EVENTS = "rh.evt.request"          # routers → manager: payload is the model name
MODEL_EVENTS_PREFIX = "rh.evt.model"       # manager → routers: ModelEvent per residency change


def model_event_subject(model: str) -> str:
    return f"{MODEL_EVENTS_PREFIX}.{model_token(model)}"
