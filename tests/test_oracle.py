"""The accuracy benchmark's oracle: the one α per bucket that best fits the recomputed π_prox."""

import math

import pytest
import torch

from benchmarks.accuracy import oracle_alpha, over_oracle


def mean_error(alpha, b, t, p, mask):
    """E(α) = mean over masked-in tokens of |α·b + (1 − α)·θ − p|, directly (float64)."""
    b, t, p = (v.double()[mask] for v in (b, t, p))
    return (alpha * b + (1 - alpha) * t - p).abs().mean().item()


# Three tokens, x = b − θ, y = p − θ, r = y/x, weight |x|:
#   b     θ     p      x      y     r    |x|
#  -1.0  -3.0  -2.6   2.0    0.4   0.2   2.0
#  -3.0  -2.0  -2.6  -1.0   -0.6   0.6   1.0
#  -1.25 -1.5  -1.25  0.25   0.25  1.0   0.25
# r sorted: 0.2, 0.6, 1.0; running |x|: 2.0, 3.0, 3.25; half of 3.25 is 1.625, first reached at
# r = 0.2, so α* = 0.2 (the unweighted median would be 0.6).
# E(0.2) = (|0.2·2 − 0.4| + |0.2·(−1) + 0.6| + |0.2·0.25 − 0.25|)/3 = (0 + 0.4 + 0.2)/3 = 0.2
# E(0.6) = (|1.2 − 0.4| + |−0.6 + 0.6| + |0.15 − 0.25|)/3 = (0.8 + 0 + 0.1)/3 = 0.3
B = torch.tensor([-1.0, -3.0, -1.25])
T = torch.tensor([-3.0, -2.0, -1.5])
P = torch.tensor([-2.6, -2.6, -1.25])


def test_three_tokens_by_hand_is_the_weighted_median():
    alpha, error = oracle_alpha(B, T, P, torch.ones(3, dtype=torch.bool))
    assert alpha.dtype == error.dtype == torch.float64 and alpha.shape == error.shape == ()
    assert alpha.item() == pytest.approx(0.2, abs=1e-6)
    assert error.item() == pytest.approx(0.2, abs=1e-6)
    assert mean_error(0.6, B, T, P, torch.ones(3, dtype=torch.bool)) == pytest.approx(0.3, abs=1e-6)  # the plain median's


def test_tokens_with_equal_inputs_add_a_constant():
    # A 4th token with b = θ = −2 (x = 0) and p = −1.7 (y = 0.3) adds |y| = 0.3 whatever α is:
    # α* stays 0.2, E = (0 + 0.4 + 0.2 + 0.3)/4 = 0.225.
    b, t, p = (torch.cat([v, torch.tensor([w])]) for v, w in ((B, -2.0), (T, -2.0), (P, -1.7)))
    alpha, error = oracle_alpha(b, t, p, torch.ones(4, dtype=torch.bool))
    assert alpha.item() == pytest.approx(0.2, abs=1e-6)
    assert error.item() == pytest.approx(0.225, abs=1e-6)
    # Only x = 0 tokens: E is constant, α* = 0 (π_θ) and E = mean |y| = (0.3 + 0.1)/2 = 0.2.
    alpha, error = oracle_alpha(torch.tensor([-2.0, -1.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.7, -1.1]), torch.ones(2))
    assert alpha.item() == 0.0
    assert error.item() == pytest.approx(0.2, abs=1e-6)


def test_masked_tokens_are_ignored_and_all_masked_is_nan():
    # A masked-out 4th token holding NaN/inf (like the prompt positions of a packed batch) changes nothing.
    b, t, p = (torch.cat([v, torch.tensor([w])]) for v, w in ((B, math.nan), (T, -math.inf), (P, 5.0)))
    mask = torch.tensor([1, 1, 1, 0])
    alpha, error = oracle_alpha(b, t, p, mask)
    assert alpha.item() == pytest.approx(0.2, abs=1e-6) and error.item() == pytest.approx(0.2, abs=1e-6)
    # Nothing to fit: (NaN, NaN), as AuditTotals.reduce gives for an audit without tokens.
    alpha, error = oracle_alpha(b, t, p, torch.zeros(4, dtype=torch.bool))
    assert math.isnan(alpha.item()) and math.isnan(error.item())


@pytest.mark.parametrize("seed", range(20))
def test_no_alpha_does_better(seed):
    g = torch.Generator().manual_seed(seed)
    shape = (int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g)))
    t = -3 * torch.rand(shape, generator=g)
    b = t + 0.3 * torch.randn(shape, generator=g)
    p = t + torch.rand(shape, generator=g) * (b - t) + 0.05 * torch.randn(shape, generator=g)  # truth near the segment
    if seed % 4 == 0:
        b = torch.where(torch.rand(shape, generator=g) < 0.3, t, b)  # some x = 0 tokens
    mask = torch.rand(shape, generator=g) < 0.8
    mask.view(-1)[0] = True
    alpha, error = oracle_alpha(b, t, p, mask)
    assert error.item() == pytest.approx(mean_error(alpha.item(), b, t, p, mask), abs=1e-12)
    # E is piecewise linear with its kinks at r_t = y_t/x_t, so its minimum is at one of them.
    x, y = (b - t).double()[mask], (p - t).double()[mask]
    kinks = (y[x != 0] / x[x != 0]).tolist()
    others = [0.0, 1.0, 0.5, 0.25, -0.5, 1.5, *torch.randn(10, generator=g).tolist()]
    errors = {a: mean_error(a, b, t, p, mask) for a in kinks + others}
    assert error.item() <= min(errors.values()) + 1e-12
    if kinks:
        assert error.item() == pytest.approx(min(errors[a] for a in kinks), abs=1e-12)


def test_over_oracle_floors_exact_zeros():
    assert over_oracle(0.2, 0.1) == pytest.approx(2.0)
    assert over_oracle(0.0, 0.0) == 1.0  # n = 1: the recompute anchor and the oracle both exact
