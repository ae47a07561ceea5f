import math

import pytest
import torch

from ponder.advantages import (
    finite_rewards,
    group_normalized,
    normalize_advantages,
    reward_weights,
    rloo_advantages,
)


def test_rloo_sums_to_zero_and_k2_case():
    r = torch.tensor([[1.0, 3.0, -2.0, 0.5], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    a = rloo_advantages(r)
    assert torch.allclose(a.sum(1), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert a[0, 0].item() == pytest.approx(1.0 - (3.0 - 2.0 + 0.5) / 3)
    two = rloo_advantages(torch.tensor([[5.0, 2.0]]))
    assert two.tolist() == [[3.0, -3.0]]
    with pytest.raises(ValueError):
        rloo_advantages(torch.tensor([[1.0]]))


def test_group_normalized():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    assert torch.allclose(group_normalized(r), torch.tensor([[1.0, -1.0, -1.0, 1.0]]), atol=1e-5)
    assert group_normalized(torch.tensor([[2.0, 2.0]])).abs().max() == 0
    assert group_normalized(r, scale=False).tolist() == [[0.5, -0.5, -0.5, 0.5]]


def test_reward_weights_rise_values():
    assert reward_weights(1.0) == pytest.approx(math.exp(2.5)) == pytest.approx(12.18, abs=0.01)
    assert reward_weights(0.0) == 1.0
    assert reward_weights(-1.0) == pytest.approx(0.082, abs=0.001)
    assert torch.allclose(reward_weights(torch.tensor([1.0, 0.0])), torch.tensor([math.exp(2.5), 1.0]))


# ---- non-finite rewards (docs/methods.md §4.11) --------------------------------------------------------------


@pytest.mark.parametrize("bad", [-math.inf, math.inf, math.nan])
def test_non_finite_rewards_are_refused_or_skipped_like_nan(bad):
    """The issue's group [−1, −2, −inf, −3]: RLOO used to give [+inf, +inf, NaN, +inf] with nothing raised."""
    r = torch.tensor([[-1.0, -2.0, bad, -3.0]], dtype=torch.float64)
    for fn in (rloo_advantages, group_normalized):
        with pytest.raises(ValueError, match="not finite"):
            fn(r)
    # skipped: the three scorable rewards by hand (leave-one-out over the other two; mean -2, population std)
    a = rloo_advantages(r, skip_nan=True)
    assert torch.isnan(a[0, 2]) and a[0, [0, 1, 3]].tolist() == [-1 - (-5) / 2, -2 - (-4) / 2, -3 - (-3) / 2]
    g = group_normalized(r, skip_nan=True)
    std = math.sqrt(2 / 3)
    assert torch.isnan(g[0, 2]) and torch.allclose(g[0, [0, 1, 3]], torch.tensor([1 / std, 0.0, -1 / std],
                                                                               dtype=torch.float64))


def test_normalize_advantages_refuses_an_infinite_advantage():
    with pytest.raises(ValueError, match="infinite"):
        normalize_advantages(torch.tensor([1.0, math.inf, 0.0]))


def test_finite_rewards_names_the_reward_and_the_problem():
    r = torch.tensor([0.5, 0.25, -math.inf, math.nan])
    with pytest.raises(ValueError, match=r"^reward mean_prob is -inf for problem q7 \(2 of 4 rewards"):
        finite_rewards(r, "raise", "mean_prob", ["q1", "q1", "q7", "q8"])
    out, n = finite_rewards(r, "skip", "mean_prob", ["q1", "q1", "q7", "q8"])
    assert n == 2 and out[:2].tolist() == [0.5, 0.25] and torch.isnan(out[2:]).all()
    same, n = finite_rewards(r[:2], "raise", "mean_prob", ["q1", "q1"])
    assert n == 0 and same.tolist() == [0.5, 0.25]


# ---- groups without spread get exactly 0 ---------------------------------------------------------------------


def test_equal_fp32_groups_get_exactly_zero_advantage():
    """Random fp32 groups of K equal rewards, K = 2..64: (mean − r) is often ±1 ulp and the std ~1e-8, which
    gave |A| up to 0.95 of one sign for the whole group before the std threshold. Now every estimator gives 0."""
    gen = torch.Generator().manual_seed(0)
    nonzero_before = 0
    for k in range(2, 65):
        values = (torch.randn(200, 1, generator=gen, dtype=torch.float64) * 10 ** torch.randint(-3, 3, (200, 1),
                  generator=gen)).float()
        r = values.expand(-1, k).contiguous()
        centred = r - r.mean(dim=1, keepdim=True)
        nonzero_before += int((centred / (r.std(dim=1, keepdim=True, unbiased=False) + 1e-6)).abs().amax(1)
                              .gt(0.1).sum())
        for unbiased in (False, True):
            assert group_normalized(r, unbiased=unbiased).abs().max().item() == 0.0, k
            assert group_normalized(r.double(), unbiased=unbiased).abs().max().item() == 0.0, k
        assert group_normalized(r, scale=False).abs().max().item() == 0.0, k
        assert rloo_advantages(r).abs().max().item() == 0.0, k
    assert nonzero_before > 1000  # the old formula on the same groups: the failure this guards against is real


def test_std_threshold_keeps_real_spread():
    """A group just above the threshold is normalised as before; one just below it gets 0."""
    above = torch.tensor([[0.0, 4e-6]], dtype=torch.float64)   # population std 2e-6
    assert torch.allclose(group_normalized(above), torch.tensor([[-1.0, 1.0]], dtype=torch.float64) * 2e-6 / 3e-6)
    below = torch.tensor([[0.0, 1e-6]], dtype=torch.float64)   # std 5e-7 < 1e-6
    assert group_normalized(below).abs().max().item() == 0.0
    assert group_normalized(below, scale=False).tolist() == [[-5e-7, 5e-7]]  # no division: the mean baseline stays
