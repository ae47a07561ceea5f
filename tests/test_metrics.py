import itertools
import math

import pytest

from ponder.metrics import maj_correct, majority, pass_at_k


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_brute_force(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_values():
    assert pass_at_k(5, 1, 1) == pytest.approx(0.2)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(200, 13, 100) == pytest.approx(1 - math.comb(187, 100) / math.comb(200, 100), rel=1e-9)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_majority_tie_goes_to_first_seen():
    assert majority(["a", "b", "b", "a"]) == 0
    assert majority(["b", "a", "a", "b", "c"]) == 0
    assert majority([None, "x", "y", "y"]) == 2
    assert majority([None, None]) is None
    assert majority([]) is None
    assert maj_correct(["7", "8", "8"], [True, False, False]) is False
    assert maj_correct(["7", "7", "8"], [True, True, False]) is True
    assert maj_correct([None, None], [False, False]) is False
