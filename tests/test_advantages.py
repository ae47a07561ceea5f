import math

import pytest
import torch

from ponder.advantages import group_normalized, reward_weights, rloo_advantages


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
