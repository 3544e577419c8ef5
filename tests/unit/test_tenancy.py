"""Tenants: the config section, keys, what a tenant may call, the auth guard, and the limit decisions."""
from __future__ import annotations

import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.v1 import router_pb2
from roundhouse import catalogue, routing, tenancy
from roundhouse.errors import PermissionDenied, Unauthenticated
from router_svc import limits, validate
from router_svc.auth import ANYONE, Auth, Guard, Tenant, check_model, peer_host

pytestmark = pytest.mark.unit

KEY_A, KEY_B = "rh-key-of-team-a-0123456789", "rh-key-of-team-b-0123456789"


def _catalogue(tenants, tmp_path: pathlib.Path | None = None) -> catalogue.Catalogue:
    raw = {
        "models": [
            {"name": "tiny-chat", "aliases": ["chat"], "path": "m/chat", "max_model_len": 512,
             "adapters": [{"name": "support-tone", "path": "a/support"}]},
            {"name": "tiny-code", "aliases": ["code"], "path": "m/code", "max_model_len": 512},
            {"name": "tiny-reason", "aliases": ["reasoning"], "path": "m/reason", "max_model_len": 512},
        ],
        "routing": {"fallback": "chat", "rules": [{"name": "code", "model": "code", "patterns": ["def "]}]},
        "tenants": tenants,
    }
    return catalogue.from_mapping(raw, tmp_path or pathlib.Path("."))


def test_a_tenant_section_parses_with_defaults():
    cat = _catalogue([{"name": "team-a", "keys": [{"sha256": tenancy.digest(KEY_A)}]}])
    (t,) = cat.tenants
    assert t.models == ("*",) and not t.limits.any
    assert Auth(cat).authenticate(f"Bearer {KEY_A}").models == {"tiny-chat", "tiny-code", "tiny-reason", "support-tone"}


@pytest.mark.parametrize("tenants, where", [
    ([{"name": "a b", "keys": [{"sha256": "0" * 64}]}], "tenants[0].name"),
    ([{"name": "a", "keys": []}], "tenants[0].keys"),
    ([{"name": "a", "keys": [{"sha256": "xyz"}]}], "tenants[0].keys[0].sha256"),
    ([{"name": "a", "keys": [{"env": "X", "file": "y"}]}], "tenants[0].keys[0]"),
    ([{"name": "a", "keys": [{"env": "X"}], "limits": {"requests_per_minute": 0}}], "tenants[0].limits.requests_per_minute"),
    ([{"name": "a", "keys": [{"env": "X"}], "limits": {"requests_per_minute": "5"}}], "tenants[0].limits.requests_per_minute"),
    ([{"name": "a", "keys": [{"env": "X"}], "limits": {"rpm": 5}}], "tenants[0].limits.rpm"),
    ([{"name": "a", "keys": [{"env": "X"}], "models": ["chat", "kod*"]}], "tenants[a].models[1]"),
    ([{"name": "a", "keys": [{"env": "X"}]}, {"name": "a", "keys": [{"env": "Y"}]}], "tenants: name 'a' is used twice"),
    ({"name": "a"}, "tenants"),
])
def test_config_errors_name_the_key(tenants, where):
    with pytest.raises(catalogue.ConfigError) as e:
        _catalogue(tenants)
    assert str(e.value).startswith(where), str(e.value)


def test_keys_come_from_hashes_env_and_files_and_are_never_kept(tmp_path):
    (tmp_path / "b.key").write_text(KEY_B + "\n")
    cat = _catalogue([
        {"name": "team-a", "keys": [{"env": "TEAM_A_KEY"}], "models": ["chat", "support-*"]},
        {"name": "team-b", "keys": [{"file": "b.key"}, {"sha256": tenancy.digest("rh-another-key-of-b-000")}],
         "models": ["tiny-c*"], "limits": {"concurrent_requests": 2}},
    ], tmp_path)
    auth = Auth(cat, environ={"TEAM_A_KEY": KEY_A})
    a = auth.authenticate(f"Bearer {KEY_A}")
    assert a.name == "team-a" and a.models == {"tiny-chat", "support-tone"}
    assert auth.authenticate(KEY_B).name == "team-b"                      # gRPC metadata may omit "Bearer"
    assert auth.authenticate("bearer rh-another-key-of-b-000").name == "team-b"
    assert auth.authenticate(f"Bearer {KEY_B}").models == {"tiny-chat", "tiny-code"}
    assert KEY_A not in repr(vars(auth)) and KEY_B not in repr(vars(auth))
    with pytest.raises(Unauthenticated, match="required"):
        auth.authenticate(None)
    with pytest.raises(Unauthenticated) as e:
        auth.authenticate("Bearer rh-wrong-key-0000000000")
    assert "rh-wrong" not in e.value.message


def test_unreadable_or_short_keys_and_keys_shared_by_two_tenants_are_refused(tmp_path):
    cat = _catalogue([{"name": "a", "keys": [{"env": "NOPE"}]}])
    with pytest.raises(tenancy.TenancyError, match=r"tenants\[a\].keys\[0\].env: environment variable NOPE is not set"):
        Auth(cat, environ={})
    with pytest.raises(tenancy.TenancyError, match="shorter than 16"):
        Auth(cat, environ={"NOPE": "short"})
    cat = _catalogue([{"name": "a", "keys": [{"file": "missing.key"}]}], tmp_path)
    with pytest.raises(tenancy.TenancyError, match=r"keys\[0\].file: cannot read .*missing.key"):
        Auth(cat)
    cat = _catalogue([{"name": "a", "keys": [{"env": "K"}]}, {"name": "b", "keys": [{"env": "K"}]}])
    with pytest.raises(tenancy.TenancyError, match="given to tenant a"):
        Auth(cat, environ={"K": KEY_A})


def test_no_tenants_means_no_key_asked():
    auth = Auth(_catalogue(None))
    assert not auth.enabled and auth.authenticate(None) is ANYONE and auth.authenticate("Bearer x") is ANYONE


def test_new_keys_are_long_and_match_their_digest():
    key, d = tenancy.new_key()
    assert len(key) >= 40 and d == tenancy.digest(key) and tenancy.new_key()[0] != key


def _admit(cat, model, tenant, text="hello there"):
    req = router_pb2.GenerateRequest(model=model, prompt=text)
    return validate.admit(req, cat, lambda spec, r: None, now_ms=0, deadline_ms=10_000, reply_to="r", tenant=tenant)


def test_a_tenant_may_call_only_its_models_and_auto_chooses_among_them():
    cat = _catalogue([{"name": "t", "keys": [{"env": "K"}], "models": ["chat", "support-tone"]}])
    t = Auth(cat, environ={"K": KEY_A}).authenticate(KEY_A)
    assert _admit(cat, "chat", t).queued.model == "tiny-chat"
    assert _admit(cat, "support-tone", t).queued.adapter == "support-tone"
    with pytest.raises(PermissionDenied, match="tenant t\\) may not use model tiny-code"):
        _admit(cat, "code", t)
    # The rules pick code for this; the tenant may not use it, so auto falls to the routing fallback.
    a = _admit(cat, routing.AUTO, t, "def f(): pass")
    assert a.queued.model == "tiny-chat" and "not among tenant t's models" in a.route_reason
    assert _admit(cat, routing.AUTO, ANYONE, "def f(): pass").queued.model == "tiny-code"
    only_reason = Tenant("r", frozenset({"tiny-reason"}))
    assert _admit(cat, routing.AUTO, only_reason, "def f(): pass").queued.model == "tiny-reason"
    with pytest.raises(PermissionDenied):
        check_model(Tenant("none", frozenset()), "tiny-chat")


def test_the_guard_slows_a_peer_that_keeps_failing_and_only_that_peer():
    now = [0.0]
    g = Guard(clock=lambda: now[0])
    delays = [g.failed("10.0.0.1") for _ in range(10)]
    assert delays[:5] == [0.0] * 5 and delays[5:] == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert g.failed("10.0.0.2") == 0.0
    assert max(g.failed("10.0.0.1") for _ in range(20)) == 10.0
    now[0] += 601
    assert g.failed("10.0.0.1") == 0.0  # quiet long enough: starts afresh


def test_peer_host():
    assert peer_host("ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert peer_host("ipv6:[::1]:5555") == "::1"
    assert peer_host("127.0.0.1") == "127.0.0.1"


# ---- limit decisions ------------------------------------------------------------------------------

def test_sliding_window_estimate():
    assert limits.estimate(10, 60, 0) == 70
    assert limits.estimate(10, 60, 30) == 40
    assert limits.estimate(10, 60, 60) == 10


@settings(max_examples=300, deadline=None)
@given(current=st.integers(0, 500), previous=st.integers(0, 500), elapsed=st.floats(0, 59.999), limit=st.integers(1, 400))
def test_waiting_as_long_as_told_makes_room_and_not_much_sooner(current, previous, elapsed, limit):
    wait = limits.seconds_until_room(current, previous, elapsed, limit)
    assert wait >= 0

    def fits(after: float) -> bool:  # the estimate `after` seconds from now, nothing new arriving
        t = elapsed + after
        if t < 60:
            return limits.estimate(current, previous, t) + 1 <= limit + 1e-6
        return limits.estimate(0, current, t - 60) + 1 <= limit + 1e-6  # this minute became the last one

    assert fits(wait)
    if wait > 0.01:
        assert not fits(wait - 0.01)


def test_decide_names_the_limit_and_when_to_retry():
    lim = tenancy.Limits(requests_per_minute=10, tokens_per_minute=1000, tokens_per_day=5000, concurrent_requests=2)
    t = Tenant("t", None, lim)
    now = 1_000_000 * 60 + 15.0   # 15 s into a minute
    assert limits.decide(t, limits.Counts(), now) is None
    r = limits.decide(t, limits.Counts(in_flight=2), now)
    assert r.limit == "concurrent_requests" and r.retry_after_s == 1.0
    r = limits.decide(t, limits.Counts(requests=10), now)
    assert r.limit == "requests_per_minute" and r.retry_after_s == pytest.approx(45 + 6)
    r = limits.decide(t, limits.Counts(tokens=600, tokens_before=800), now)  # 600 + 800 * 0.75 = 1200
    assert r.limit == "tokens_per_minute" and 0 < r.retry_after_s < 45
    r = limits.decide(t, limits.Counts(tokens_today=5000), now)
    assert r.limit == "tokens_per_day" and r.retry_after_s == pytest.approx(86400 - now % 86400)
    assert limits.decide(Tenant("free", None), limits.Counts(requests=10**6, in_flight=10**6), now) is None


def test_charged_tokens():
    assert limits.tokens_of(10, 5, started=True) == 15
    assert limits.tokens_of(10, 0, started=False) == 0  # waited for a load, cancelled: nothing


def test_admin_section_and_credentials():
    with pytest.raises(tenancy.TenancyError, match="worker_key: .*give env or file"):
        tenancy.parse_admin({"worker_key": {"sha256": "0" * 64}})
    with pytest.raises(tenancy.TenancyError, match=r"admin.keys\[0\].sha256"):
        tenancy.parse_admin({"keys": [{"sha256": "nope"}]})
    spec = tenancy.parse_admin({"keys": [{"sha256": tenancy.digest(KEY_A)}], "worker_key": {"env": "W"}})
    creds = tenancy.AdminCredentials.of(spec, {"W": KEY_B})
    assert creds.allows(f"Bearer {KEY_A}") and not creds.allows(KEY_B) and not creds.allows(None)
    assert creds.allows(KEY_B, worker=True) and not creds.allows(KEY_A, worker=True)
    assert tenancy.AdminCredentials.of(None).allows(None) and tenancy.AdminCredentials.of(None).allows(None, worker=True)
    with pytest.raises(tenancy.TenancyError, match="admin.worker_key.env: environment variable W is not set"):
        tenancy.AdminCredentials.of(spec, {})


def test_tls_section_errors_name_the_key(tmp_path):
    with pytest.raises(catalogue.ConfigError, match=r"tls.internal.key: required"):
        catalogue.from_mapping(
            {"models": [{"name": "m", "path": "m", "max_model_len": 512}], "tls": {"internal": {"ca": "a", "cert": "b"}}})
    cat = catalogue.from_mapping({"models": [{"name": "m", "path": "m", "max_model_len": 512}],
                                  "tls": {"public": {"cert": "c.pem", "key": "c.key"}}}, tmp_path)
    assert cat.tls.public.cert == str(tmp_path / "c.pem")  # relative to the config file
    from roundhouse import tls
    with pytest.raises(tls.TlsError, match=r"tls.public.cert: cannot read .*c.pem"):
        tls.load(cat.tls)
