"""The pick policies, as pure functions: lowest expected wait in GPU seconds, no herding."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from imagefleet.router.pick import Candidate, least_wait, power_of_two


def test_least_wait_takes_the_lowest_expected_finish() -> None:
    rng = random.Random(1)
    cands = [Candidate("a", 10.0, 1.0), Candidate("b", 2.0, 1.0), Candidate("c", 5.0, 1.0)]
    assert {least_wait(cands, rng).name for _ in range(50)} == {"b"}


def test_one_huge_request_outweighs_many_small_ones() -> None:
    # One 2048x2048 50-step image (~210 units at 0.1 s/unit) against twenty 512x512 4-step ones.
    huge = Candidate("huge", wait_s=210 * 0.1, cost_s=0.1)
    small = Candidate("small", wait_s=20 * 1.05 * 0.1, cost_s=0.1)
    assert least_wait([huge, small], random.Random(0)).name == "small"


def test_the_cost_of_the_request_itself_does_not_decide() -> None:
    # Idle pods whose learned unit costs differ (measurement noise between identical GPUs) tie.
    rng = random.Random(0)
    cands = [Candidate("a", 0.0, 1.0), Candidate("b", 0.0, 3.0)]
    assert {least_wait(cands, rng).name for _ in range(100)} == {"a", "b"}


def test_near_ties_are_broken_at_random() -> None:
    rng = random.Random(7)
    cands = [
        Candidate("a", 0.0, 1.0),
        Candidate("b", 0.3, 1.0),
        Candidate("c", 0.4, 1.0),
        Candidate("d", 2.0, 1.0),
    ]
    picks = Counter(least_wait(cands, rng).name for _ in range(3000))
    assert set(picks) == {"a", "b", "c"}  # within half a request of the best; d is a request and more behind
    assert min(picks.values()) > 800


def test_a_candidate_more_than_half_a_request_behind_is_never_chosen() -> None:
    cands = [Candidate("a", 0.0, 1.0), Candidate("b", 0.51, 1.0)]
    assert {least_wait(cands, random.Random(i)).name for i in range(200)} == {"a"}


def test_free_requests_tie_everywhere() -> None:
    cands = [Candidate(n, 0.0, 0.0) for n in "abc"]
    rng = random.Random(3)
    picks = Counter(least_wait(cands, rng).name for _ in range(300))
    assert set(picks) == {"a", "b", "c"}


def test_replicas_with_the_same_view_spread_out() -> None:
    """Ten routers holding the same stale view of four idle pods do not all choose the same one."""
    cands = [Candidate(n, 0.0, 1.0) for n in "abcd"]
    chosen = Counter(least_wait(cands, random.Random(seed)).name for seed in range(10))
    assert len(chosen) >= 3
    assert max(chosen.values()) <= 5


def test_power_of_two_never_picks_the_worst() -> None:
    rng = random.Random(0)
    cands = [Candidate("a", 1.0, 1.0), Candidate("b", 2.0, 1.0), Candidate("c", 9.0, 1.0)]
    picks = Counter(power_of_two(cands, rng).name for _ in range(3000))
    assert "c" not in picks
    assert picks["a"] > picks["b"] > 0  # a wins both draws that include it, b only (b, c)


def test_power_of_two_with_one_candidate() -> None:
    only = Candidate("a", 5.0, 1.0)
    assert power_of_two([only], random.Random(0)) is only


@pytest.mark.parametrize("pick", [least_wait, power_of_two])
def test_no_candidates_is_an_error(pick) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        pick([], random.Random(0))
