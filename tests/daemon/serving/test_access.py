"""Access control of the OpenAI-compatible endpoint (daemon.serving.access): keys, OpenAI's
error shapes, request rates, token quotas and concurrency, on a fake clock."""

from __future__ import annotations

import hashlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.serving import access as access_module
from daemon.serving.access import Access, AccessError
from daemon.serving.settings import ApiKey, ServingConfig

ALICE = "gm-alice-0123456789abcdefghijklmnop"
BOB = "gm-bob-0123456789abcdefghijklmnopqrs"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def gate(*keys: ApiKey, clock: Clock | None = None, **serving) -> Access:
    return Access(ServingConfig(api_keys=keys or None, **serving), clock=clock or Clock())


def alice(**limits) -> ApiKey:
    return ApiKey(name="alice", key_sha256=digest(ALICE), **limits)


def refusal(call) -> AccessError:
    with pytest.raises(AccessError) as info:
        call()
    return info.value


# -- keys ----------------------------------------------------------------------------------


def test_without_keys_loopback_use_is_anonymous_whatever_the_header():
    access = gate()
    for header in (None, "Bearer anything", "Basic x", ""):
        principal = access.admit(header, loopback=True)
        assert principal.anonymous and principal.name == "anonymous"
    assert not access.keys_required


def test_beyond_loopback_a_key_is_required_from_everyone():
    access = gate(alice(), host="0.0.0.0")
    assert access.keys_required
    for loopback in (True, False):
        error = refusal(lambda lb=loopback: access.admit(None, loopback=lb))
        assert (error.status, error.type, error.code) == (401, "invalid_request_error", None)
        assert error.message.startswith("You didn't provide an API key. You need to provide")
        assert error.body() == {
            "error": {
                "message": error.message,
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
        principal = access.admit(f"Bearer {ALICE}", loopback=loopback)
        assert (principal.name, principal.anonymous) == ("alice", False)


def test_a_wrong_key_is_401_invalid_api_key_and_shown_masked():
    access = gate(alice(), host="0.0.0.0")
    wrong = "gm-wrong-0123456789abcdefghijklmn"
    error = refusal(lambda: access.admit(f"Bearer {wrong}", loopback=False))
    assert (error.status, error.type, error.code) == (
        401,
        "invalid_request_error",
        "invalid_api_key",
    )
    assert error.message.startswith("Incorrect API key provided: gm-w*")
    assert wrong not in error.message and error.message.count("*") >= 8
    # a header that is not Bearer, or Bearer without a key, is a missing key
    for header in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", ALICE):
        assert refusal(lambda h=header: access.admit(h, loopback=False)).code is None
    # the scheme is case-insensitive and spaces around the key do not matter
    assert access.admit(f"bearer   {ALICE}  ", loopback=False).name == "alice"
    assert refusal(lambda: access.admit("Bearer " + "x" * 5000, loopback=False)).status == 401


def test_keys_on_loopback_are_optional_unless_required():
    access = gate(alice())
    assert access.admit(None, loopback=True).anonymous
    assert access.admit(f"Bearer {ALICE}", loopback=True).name == "alice"
    # a key that is presented must be right, and a non-loopback client must present one
    assert refusal(lambda: access.admit("Bearer nope-nope-nope", loopback=True)).status == 401
    assert refusal(lambda: access.admit(None, loopback=False)).status == 401
    required = gate(alice(), require_keys=True)
    assert refusal(lambda: required.admit(None, loopback=True)).status == 401
    assert required.admit(f"Bearer {ALICE}", loopback=True).name == "alice"


def test_a_plaintext_key_in_the_config_is_hashed_and_works():
    access = gate(ApiKey(name="bob", key=BOB), alice(), host="::")
    assert access.admit(f"Bearer {BOB}", loopback=False).name == "bob"
    assert access.admit(f"Bearer {ALICE}", loopback=False).name == "alice"
    assert all(len(stored) == 32 for stored, _ in access._keys)


def test_every_stored_digest_is_compared_in_constant_time(monkeypatch):
    calls = []

    def compare(a, b):
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(access_module.hmac, "compare_digest", compare)
    keys = [ApiKey(name=f"k{i}", key=f"key-number-{i:02d}-abcdefghij") for i in range(5)]
    access = gate(*keys, host="0.0.0.0")
    assert access.admit("Bearer key-number-00-abcdefghij", loopback=False).name == "k0"
    assert len(calls) == 5  # not stopped at the first match
    calls.clear()
    refusal(lambda: access.admit("Bearer key-number-99-abcdefghij", loopback=False))
    assert len(calls) == 5


# -- request rate --------------------------------------------------------------------------


def test_requests_per_minute_is_a_bucket_of_a_minutes_requests():
    clock = Clock()
    access = gate(alice(requests_per_minute=3), clock=clock, host="0.0.0.0")
    for _ in range(3):
        access.admit(f"Bearer {ALICE}", loopback=False).release()
    error = refusal(lambda: access.admit(f"Bearer {ALICE}", loopback=False))
    assert (error.status, error.type, error.code) == (429, "requests", "rate_limit_exceeded")
    assert error.retry_after == pytest.approx(20.0)
    assert "Limit 3, Used 3, Requested 1. Please try again in 20s." in error.message
    clock.now += 19.9
    assert refusal(lambda: access.admit(f"Bearer {ALICE}", loopback=False)).retry_after < 0.2
    clock.now += 0.1
    access.admit(f"Bearer {ALICE}", loopback=False)
    # another key has its own bucket
    bob = gate(ApiKey(name="bob", key=BOB, requests_per_minute=3), clock=clock, host="0.0.0.0")
    bob.admit(f"Bearer {BOB}", loopback=False)


def test_a_refused_request_takes_no_place_and_no_rate():
    clock = Clock()
    access = gate(alice(requests_per_minute=2, max_concurrent=1), clock=clock, host="0.0.0.0")
    first = access.admit(f"Bearer {ALICE}", loopback=False)
    assert refusal(lambda: access.admit(f"Bearer {ALICE}", loopback=False)).status == 429
    first.release()
    access.admit(f"Bearer {ALICE}", loopback=False)  # the second of two per minute


# -- concurrency ---------------------------------------------------------------------------


def test_max_concurrent_counts_requests_until_released():
    access = gate(alice(max_concurrent=2), host="0.0.0.0")
    one = access.admit(f"Bearer {ALICE}", loopback=False)
    with access.admit(f"Bearer {ALICE}", loopback=False):
        error = refusal(lambda: access.admit(f"Bearer {ALICE}", loopback=False))
        assert (error.status, error.type, error.code) == (429, "requests", "rate_limit_exceeded")
        assert "Too many concurrent requests for key 'alice': limit 2" in error.message
    access.admit(f"Bearer {ALICE}", loopback=False)  # the `with` released its place
    one.release()
    one.release()  # idempotent: frees one place, not two
    access.admit(f"Bearer {ALICE}", loopback=False)
    assert refusal(lambda: access.admit(f"Bearer {ALICE}", loopback=False)).status == 429


def test_max_concurrent_per_key_is_the_default_of_keys_without_their_own():
    keys = (alice(), ApiKey(name="bob", key=BOB, max_concurrent=3))
    access = gate(*keys, max_concurrent_per_key=1, host="0.0.0.0")
    access.admit(f"Bearer {ALICE}", loopback=False)
    assert refusal(lambda: access.admit(f"Bearer {ALICE}", loopback=False)).status == 429
    for _ in range(3):
        access.admit(f"Bearer {BOB}", loopback=False)


def test_anonymous_use_has_the_anonymous_limits():
    clock = Clock()
    access = gate(
        clock=clock,
        anonymous_requests_per_minute=60,
        anonymous_tokens_per_day=100,
        anonymous_max_concurrent=1,
    )
    first = access.admit(None, loopback=True)
    error = refusal(lambda: access.admit(None, loopback=True))
    assert "concurrent requests for anonymous use" in error.message
    error = refusal(lambda: first.reserve(101))
    assert error.code == "insufficient_quota" and "anonymous use" in error.message
    first.reserve(100)
    first.release()
    second = access.admit(None, loopback=True)
    assert refusal(lambda: second.reserve(1)).retry_after == pytest.approx(864.0)


# -- token quota ---------------------------------------------------------------------------


def test_reserve_up_front_and_settle_gives_back_the_unused_part():
    clock = Clock()
    access = gate(alice(tokens_per_day=1000), clock=clock, host="0.0.0.0")
    principal = access.admit(f"Bearer {ALICE}", loopback=False)
    principal.reserve(600)
    error = refusal(lambda: principal.reserve(500))
    assert (error.status, error.type, error.code) == (
        429,
        "insufficient_quota",
        "insufficient_quota",
    )
    assert error.message.startswith("You exceeded your current quota")
    assert "has 400 of its 1000 tokens per day left" in error.message
    # 100 tokens come back in a day's tenth
    assert error.retry_after == pytest.approx(100 * 86400 / 1000)
    principal.settle(600, 100)  # 500 unused: back into the quota
    principal.reserve(500)
    principal.reserve(400)
    assert refusal(lambda: principal.reserve(1)).retry_after == pytest.approx(86.4)
    clock.now += 86.4
    principal.reserve(1)


def test_a_request_larger_than_the_whole_quota_is_told_so():
    access = gate(alice(tokens_per_day=1000), host="0.0.0.0")
    principal = access.admit(f"Bearer {ALICE}", loopback=False)
    error = refusal(lambda: principal.reserve(1001))
    assert error.status == 429 and error.retry_after is None
    assert "needs 1001 tokens" in error.message and "more than the 1000 tokens" in error.message


def test_release_charges_what_is_still_reserved_and_settle_checks_its_arguments():
    access = gate(alice(tokens_per_day=1000), host="0.0.0.0")
    principal = access.admit(f"Bearer {ALICE}", loopback=False)
    principal.reserve(700)
    with pytest.raises(ValueError):
        principal.settle(800, 0)  # more than was reserved
    with pytest.raises(ValueError):
        principal.settle(700, -1)
    with pytest.raises(ValueError):
        principal.reserve(-1)
    principal.release()  # not settled: all 700 count as used
    again = access.admit(f"Bearer {ALICE}", loopback=False)
    assert refusal(lambda: again.reserve(301)).status == 429
    again.reserve(300)


def test_tokens_held_while_the_bucket_refills_are_not_counted_twice():
    """A day-long request that reserved the whole quota and used nothing: what refilled
    meanwhile and what it gives back together never exceed one day's tokens."""
    clock = Clock()
    access = gate(alice(tokens_per_day=1000), clock=clock, host="0.0.0.0")
    long = access.admit(f"Bearer {ALICE}", loopback=False)
    long.reserve(1000)
    clock.now += 86400
    long.settle(1000, 0)
    other = access.admit(f"Bearer {ALICE}", loopback=False)
    other.reserve(1000)
    assert refusal(lambda: other.reserve(1)).status == 429


def test_more_used_than_reserved_is_a_debt():
    clock = Clock()
    access = gate(alice(tokens_per_day=86400), clock=clock, host="0.0.0.0")
    principal = access.admit(f"Bearer {ALICE}", loopback=False)
    principal.reserve(86400)
    principal.settle(86400, 86500)  # 100 over: paid back by refilling first (100 s at 1 per s)
    clock.now += 100
    assert refusal(lambda: principal.reserve(1)).status == 429
    clock.now += 1
    principal.reserve(1)


# -- no interleaving lets a key exceed its limits -------------------------------------------

RPM, TPD, MOST = 6, 5000, 3
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.just(0)),
        st.tuples(
            st.just("reserve"), st.sampled_from([TPD // 3, TPD // 2, TPD]) | st.integers(0, 6000)
        ),
        st.tuples(st.just("settle"), st.sampled_from([0, 100]) | st.integers(0, 100)),  # % used
        st.tuples(st.just("release"), st.integers(0, 10)),
        st.tuples(st.just("wait"), st.sampled_from([86_400.0]) | st.floats(0, 40_000)),
    ),
    max_size=80,
)


@settings(max_examples=500, deadline=None)
@given(ops=OPS)
def test_no_interleaving_exceeds_the_rate_the_quota_or_the_concurrency(ops):
    clock = Clock()
    limits = alice(requests_per_minute=RPM, tokens_per_day=TPD, max_concurrent=MOST)
    access = gate(limits, clock=clock, host="0.0.0.0")
    live: list = []  # admitted, not released: [principal, [reservations]]
    admitted: list[float] = []  # times
    used: list[tuple[float, int]] = []  # (settle time, tokens used)
    for op, arg in ops:
        if op == "admit":
            try:
                live.append([access.admit(f"Bearer {ALICE}", loopback=False), []])
                admitted.append(clock.now)
            except AccessError as exc:
                assert exc.status == 429 and exc.retry_after is not None
        elif op == "reserve" and live:
            principal, reservations = live[arg % len(live)]
            try:
                principal.reserve(arg)
                reservations.append(arg)
            except AccessError as exc:
                assert exc.code == "insufficient_quota"
        elif op == "settle":
            for principal, reservations in sorted(live, key=lambda item: -len(item[1])):
                if reservations:
                    reserved = reservations.pop()
                    tokens = reserved * arg // 100
                    principal.settle(reserved, tokens)
                    used.append((clock.now, tokens))
                    break
        elif op == "release" and live:
            principal, reservations = live.pop(arg % len(live))
            principal.release()
            used.append((clock.now, sum(reservations)))  # charged as used
        elif op == "wait":
            clock.now += arg
        assert len(live) <= MOST
        # never more than a day's tokens reserved at once
        assert sum(sum(r) for _, r in live) <= TPD
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            span = admitted[j] - start
            assert j - i + 1 <= RPM * (1 + span / 60) + 1e-6
    for i, (start, _) in enumerate(used):
        total = 0
        for end, tokens in used[i:]:
            total += tokens
            assert total <= TPD * (1 + (end - start) / 86400) + 1e-6


def test_waits_are_worded_as_openai_does():
    assert [access_module._seconds(s) for s in (0.0004, 0.25, 1.23, 20, 68.7, 7384)] == [
        "1ms",
        "250ms",
        "1.3s",
        "20s",
        "1m8.7s",
        "2h3m4s",
    ]


def test_the_bucket_reports_inf_for_what_never_fits():
    bucket = access_module.Bucket(10, 1.0, now=0.0)
    assert bucket.take(11, 0.0) == math.inf
    assert bucket.take(10, 0.0) == 0.0 and bucket.take(4, 0.0) == pytest.approx(4.0)
