"""The A-3PO formulas, pinned against values computed by hand (arithmetic in the comments)."""

import math

import pytest
import torch

from areal_a3po import ANCHORS, INTERPOLATIONS, Registry, approximate_prox_logp, interpolation_weights
from areal_a3po.proximal import paper_anchor, recompute_anchor

# One row, trainer version k = 5. Versions: prompt, d=0, d=1, d=2, d=4.
K = 5
VERSIONS = torch.tensor([[-1, 5, 4, 3, 1]])
BEHAVE = torch.tensor([[-9.0, -1.0, -2.0, -3.0, -0.5]])
THETA = torch.tensor([[-7.0, -1.5, -1.0, -1.0, -2.1]])


def test_paper_alpha_is_one_over_staleness():
    # d = k - v = [prompt, 0, 1, 2, 4] -> alpha = [0, 0, 1/1, 1/2, 1/4]
    alpha = paper_anchor(VERSIONS, K)
    assert alpha.dtype == torch.float32
    torch.testing.assert_close(alpha, torch.tensor([[0.0, 0.0, 1.0, 0.5, 0.25]]), rtol=0, atol=0)


def test_paper_loglinear_matches_hand_values():
    # log pi_prox = alpha*log pi_behave + (1-alpha)*log pi_theta
    #   prompt: theta = -7;  d=0: theta = -1.5;  d=1: behave = -2.0
    #   d=2: 0.5*(-3.0) + 0.5*(-1.0) = -2.0
    #   d=4: 0.25*(-0.5) + 0.75*(-2.1) = -0.125 - 1.575 = -1.7
    prox = approximate_prox_logp(BEHAVE, THETA, VERSIONS, K, anchor="paper", interpolation="loglinear")
    torch.testing.assert_close(prox, torch.tensor([[-7.0, -1.5, -2.0, -2.0, -1.7]]), rtol=0, atol=1e-6)


def test_paper_linear_matches_hand_values():
    # pi_prox = alpha*pi_behave + (1-alpha)*pi_theta
    #   d=2: log(0.5*e^-3 + 0.5*e^-1) = log(0.0248935 + 0.1839397) = -1.5662192
    #   d=4: log(0.25*e^-0.5 + 0.75*e^-2.1) = log(0.1516327 + 0.0918421) = -1.4127411
    prox = approximate_prox_logp(BEHAVE, THETA, VERSIONS, K, anchor="paper", interpolation="linear")
    expected = torch.tensor([[-7.0, -1.5, -2.0, -1.5662192, -1.4127411]])
    torch.testing.assert_close(prox, expected, rtol=0, atol=1e-6)


def test_paper_ratios_are_powers():
    # Paper: r = pi_theta/pi_prox = (pi_theta/pi_behave)^alpha and pi_prox/pi_behave = (pi_theta/pi_behave)^(1-alpha).
    # Generated tokens d = 0, 1, 2, 4 -> alpha = 0, 1, 1/2, 1/4; log(pi_theta/pi_behave) = theta - behave:
    #   -1.5-(-1) = -0.5;  -1-(-2) = 1;  -1-(-3) = 2;  -2.1-(-0.5) = -1.6
    # log r        = alpha*(theta - behave)     = 0, 1, 2/2 = 1, -1.6/4 = -0.4
    # log(prox/b)  = (1-alpha)*(theta - behave) = -0.5, 0, 2/2 = 1, 0.75*(-1.6) = -1.2
    prox = approximate_prox_logp(BEHAVE, THETA, VERSIONS, K)
    gen = VERSIONS >= 0
    torch.testing.assert_close((THETA - prox)[gen], torch.tensor([0.0, 1.0, 1.0, -0.4]), rtol=0, atol=1e-6)
    torch.testing.assert_close((prox - BEHAVE)[gen], torch.tensor([-0.5, 0.0, 1.0, -1.2]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("interpolation", ["loglinear", "linear"])
def test_prox_is_sandwiched_between_behave_and_theta(interpolation):
    g = torch.Generator().manual_seed(0)
    behave = -torch.rand(4, 64, generator=g) * 8
    theta = -torch.rand(4, 64, generator=g) * 8
    versions = torch.randint(0, 9, (4, 64), generator=g)
    prox = approximate_prox_logp(behave, theta, versions, 8, interpolation=interpolation)
    lo, hi = torch.minimum(behave, theta), torch.maximum(behave, theta)
    assert bool(((prox >= lo - 1e-6) & (prox <= hi + 1e-6)).all())


def test_recompute_alpha_matches_hand_values():
    # k = 5, minibatch j = 2 of n = 4: pi_theta is at version 5.5, j/n = 0.5.
    # weight on behave alpha = (j/n) / (k + j/n - v):
    #   v=5: 0.5/0.5 = 1 (pi_behave is pi at version 5: exact)
    #   v=4: 0.5/1.5 = 1/3;  v=3: 0.5/2.5 = 0.2;  v=1: 0.5/4.5 = 1/9
    alpha = recompute_anchor(VERSIONS, K, 2, 4)
    torch.testing.assert_close(alpha, torch.tensor([[0.0, 1.0, 1 / 3, 0.2, 1 / 9]]), rtol=0, atol=1e-7)


def test_recompute_first_minibatch_is_theta_exactly():
    # j = 0: pi_theta is pi at version k, alpha = 0 everywhere, prox == theta bit for bit.
    alpha = recompute_anchor(VERSIONS, K, 0, 4)
    assert torch.equal(alpha, torch.zeros_like(alpha))
    prox = approximate_prox_logp(BEHAVE, THETA, VERSIONS, K, anchor="recompute", n_minibatches=4)
    assert torch.equal(prox, THETA)


def test_recompute_linear_matches_hand_values():
    # j/n = 1/2, v = 4 -> alpha = 1/3: log(1/3*e^-2 + 2/3*e^-1) = log(0.0451118 + 0.2452530) = -1.2366175
    prox = approximate_prox_logp(
        BEHAVE, THETA, VERSIONS, K, anchor="recompute", interpolation="linear", minibatch=2, n_minibatches=4
    )
    assert prox[0, 2].item() == pytest.approx(-1.2366175, abs=1e-6)


def test_recompute_clamps_future_versions_to_theta():
    # v = 6 > k = 5 would give (0.5)/(5 + 0.5 - 6) = -1: outside [0, 1], so alpha = 0 (pi_theta).
    alpha = recompute_anchor(torch.tensor([6, 7, 5]), 5, 1, 2)
    torch.testing.assert_close(alpha, torch.tensor([0.0, 0.0, 1.0]), rtol=0, atol=0)
    assert paper_anchor(torch.tensor([6]), 5).item() == 0.0


@pytest.mark.parametrize("minibatch, n", [(-1, 2), (2, 2), (0, 0)])
def test_recompute_rejects_bad_minibatch(minibatch, n):
    with pytest.raises(ValueError, match="minibatch must be in"):
        recompute_anchor(VERSIONS, K, minibatch, n)


@pytest.mark.parametrize("interpolation", ["loglinear", "linear"])
@pytest.mark.parametrize("anchor", ["paper", "recompute"])
def test_absurd_values_in_masked_and_prompt_positions_change_nothing(anchor, interpolation):
    # Masked / prompt positions hold garbage; they return theta and leave the others untouched.
    mask = torch.tensor([[False, True, True, False, True]])
    garbage = torch.tensor([[float("nan"), 0.0, 0.0, 1e4, 0.0]])
    behave = torch.where(mask, BEHAVE, garbage)
    behave[0, 0] = float("-inf")
    kw = dict(anchor=anchor, interpolation=interpolation, minibatch=1, n_minibatches=2)
    prox = approximate_prox_logp(behave, THETA, VERSIONS, K, loss_mask=mask, **kw)
    clean = approximate_prox_logp(BEHAVE, THETA, VERSIONS, K, **kw)
    assert torch.isfinite(prox).all()
    torch.testing.assert_close(prox[mask], clean[mask], rtol=0, atol=0)
    torch.testing.assert_close(prox[~mask], THETA[~mask], rtol=0, atol=0)
    # Theta of -1e4 at a masked position stays finite too.
    theta = THETA.clone()
    theta[0, 3] = -1e4
    assert torch.isfinite(approximate_prox_logp(behave, theta, VERSIONS, K, loss_mask=mask, **kw)).all()


def test_bf16_inputs_are_computed_in_float32():
    # bf16 holds -3.0 and -1.0078125 (= -(1 + 2^-7)) exactly. d = 4 -> alpha = 1/4:
    #   0.25*(-3.0) + 0.75*(-1.0078125) = -0.75 - 0.755859375 = -1.505859375 (a float32 value;
    #   bf16 arithmetic would round it to -1.5078125).
    behave = torch.tensor([-3.0], dtype=torch.bfloat16)
    theta = torch.tensor([-1.0078125], dtype=torch.bfloat16)
    prox = approximate_prox_logp(behave, theta, torch.tensor([1]), 5)
    assert prox.dtype == torch.float32
    assert prox.item() == -1.505859375
    assert approximate_prox_logp(behave.half(), theta.half(), torch.tensor([1]), 5).dtype == torch.float32


def test_theta_is_detached():
    theta = THETA.clone().requires_grad_(True)
    prox = approximate_prox_logp(BEHAVE, theta, VERSIONS, K)
    assert not prox.requires_grad


def test_linear_is_stable_for_very_negative_logprobs():
    # exp(-200) underflows float32 to 0; the log-space form still gives the exact mixture:
    # log(0.5*e^-200 + 0.5*e^-201) = -200 + log(0.5*(1 + e^-1)) = -200 - 0.3798854
    prox = approximate_prox_logp(torch.tensor([-200.0]), torch.tensor([-201.0]), torch.tensor([3]), 5, interpolation="linear")
    assert prox.item() == pytest.approx(-200.3798854, abs=1e-4)


def test_loss_mask_zeroes_alpha():
    alpha = interpolation_weights(VERSIONS, K, loss_mask=torch.tensor([[1, 1, 0, 1, 1]]))
    torch.testing.assert_close(alpha, torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.25]]), rtol=0, atol=0)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="behave_logp, theta_logp and versions must have one shape"):
        approximate_prox_logp(BEHAVE, THETA, VERSIONS[:, :3], K)


def test_registry_rejects_duplicates_and_names_choices():
    assert sorted(ANCHORS) == ["paper", "recompute"]
    assert sorted(INTERPOLATIONS) == ["linear", "loglinear"]
    with pytest.raises(ValueError, match="anchor 'paper' is already registered"):
        ANCHORS.register("paper")(lambda *a: None)
    with pytest.raises(ValueError, match=r"unknown interpolation 'cubic'; choose one of \['linear', 'loglinear'\]"):
        approximate_prox_logp(BEHAVE, THETA, VERSIONS, K, interpolation="cubic")
    with pytest.raises(ValueError, match="unknown anchor 'latest'"):
        approximate_prox_logp(BEHAVE, THETA, VERSIONS, K, anchor="latest")


def test_a_fresh_registry_registers_and_returns():
    reg = Registry("thing")
    fn = reg.register("x")(math.sqrt)
    assert fn is math.sqrt and reg.get("x") is math.sqrt


def test_math_module_does_not_import_areal():
    import subprocess
    import sys

    code = "import sys, areal_a3po; areal_a3po.approximate_prox_logp; print('areal' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
