"""Delivery numbers and real attempts across hand-back copies (worker_svc.redelivery)."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker_svc import redelivery
from worker_svc.redelivery import MAX_ATTEMPTS, copy_headers, delivery

pytestmark = pytest.mark.unit


def test_a_first_message_is_delivery_one_with_no_attempts():
    assert delivery(None, 1) == redelivery.Delivery(number=1, attempts=0)
    assert delivery({}, 0).number == 1, "a missing count is a first delivery"


def test_redeliveries_of_one_copy_are_real_attempts_and_hand_backs_are_not():
    d = delivery({}, 3)                       # delivered 3 times: two runs died before this one
    assert (d.number, d.attempts) == (3, 2)
    copy = copy_headers({"Other": "kept"}, d, stream_seq=41)  # handed back (evicting): a copy
    assert copy["Other"] == "kept" and copy["Nats-Msg-Id"] == "rh-copy-of-41"
    again = delivery(copy, 1)
    assert again.number == 4, "numbers keep increasing for the router's splice guard"
    assert again.attempts == 2, "the hand-back itself was no attempt"
    assert not again.exhausted and delivery(copy, 2).exhausted, f"one more death makes {MAX_ATTEMPTS}"


def test_bad_headers_count_as_none():
    assert delivery({redelivery.ATTEMPTS_BEFORE: "lots", redelivery.DELIVERIES_BEFORE: "-5"}, 1) == redelivery.Delivery(1, 0)


@given(st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=8))
def test_numbers_strictly_increase_over_any_chain_of_copies(deliveries_per_copy):
    headers: dict = {}
    last = 0
    for n in deliveries_per_copy:
        for k in range(1, n + 1):
            d = delivery(headers, k)
            assert d.number > last
            last = d.number
        headers = copy_headers(headers, d, stream_seq=len(headers))
    assert delivery(headers, 1).attempts == sum(n - 1 for n in deliveries_per_copy)


def test_a_suspect_stays_one_across_copies_and_spends_no_attempt():
    d = delivery({}, 1)
    assert not d.suspect
    copy = copy_headers({}, d, stream_seq=7, suspect=True)   # its engine died with others in it
    again = delivery(copy, 1)
    assert again.suspect and again.attempts == 0 and again.number == 2
    assert delivery(copy_headers(copy, again, stream_seq=8), 1).suspect, "handed back again (evicting): still a suspect"
