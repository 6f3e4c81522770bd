"""The A-3PO loss against hand values and AReaL's own ``grpo_loss_fn``, the update's engine view, and
the actor's batch preparation (version alignment) on AReaL's FSDP actor.

The engine view's tests hand it a recorder as the engine it wraps: they check what the view passes
on (the minibatch index, AReaL's loss arguments) and its two refusals, not an engine.
"""

import functools
import math

import pytest
import torch
from areal.api.cli_args import RejectionSamplingConfig
from areal.trainer.ppo.actor import grpo_loss_fn

from areal_a3po.actor import AREAL_VERSIONS_KEY
from areal_a3po.config import A3POConfig
from areal_a3po.loss import A3POUpdateEngine, StepAudit, a3po_loss_fn

RS = RejectionSamplingConfig(level="token", action="mask", metric="ratio", upper=5.0)
AREAL_KW = dict(eps_clip=0.2, eps_clip_higher=None, c_clip=None, rejection_sampling=RS, use_decoupled_loss=True)

# One packed sequence at trainer version k = 5: a prompt token, then d = 0, 1, 2, 4.
K = 5
VERSIONS = torch.tensor([-1, 5, 4, 3, 1])
LOSS_MASK = torch.tensor([0, 1, 1, 1, 1])
BEHAVE = torch.tensor([0.0, -1.0, -2.0, -3.0, -0.5])
THETA = torch.tensor([-7.0, -1.5, -1.0, -1.0, -2.1])
ADVANTAGES = torch.tensor([0.0, 1.0, -1.0, 1.0, -1.0])


def _batch(**extra):
    return dict(logprobs=BEHAVE, versions=VERSIONS, loss_mask=LOSS_MASK, advantages=ADVANTAGES, **extra)


def test_paper_loss_and_gradient_by_hand():
    # Paper anchor α = 1/d: [·, 0, 1, 1/2, 1/4]; π_prox = θ + α(b − θ) = [·, -1.5, -2.0, -2.0, -1.7].
    # Per token (decoupled PPO, ε = 0.2, behaviour weight w = e^(prox − b) ≤ 5 kept):
    #   t1: r = e^(θ−prox) = 1,           A = +1: -min(r, clip r)·A = -1,     w = e^-0.5 = 0.6065307 -> -0.6065307
    #   t2: r = e^1 = 2.7182818,          A = -1: max(rA', ...) = 2.7182818,  w = 1         ->  2.7182818
    #   t3: r = e^1 (clipped at 1.2),     A = +1: -1.2,                       w = e^1       -> -3.2619382
    #   t4: r = e^-0.4 (clipped at 0.8),  A = -1: 0.8,                        w = e^-1.2 = 0.3011942 -> 0.2409554
    #   loss = (-0.6065307 + 2.7182818 - 3.2619382 + 0.2409554) / 4 = -0.9092317 / 4 = -0.2273079
    # Gradient only through unclipped ratios: t1 -w·r/4 = -0.1516327, t2 +r/4 = 0.6795705.
    theta = THETA.clone().requires_grad_(True)
    loss = a3po_loss_fn(
        theta, torch.zeros(5), _batch(), a3po=A3POConfig(anchor="paper"), minibatch=0, n_minibatches=1,
        current_version=K, **AREAL_KW,
    )
    loss.backward()
    assert loss.item() == pytest.approx(-0.2273079, abs=1e-6)
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -0.1516327, 0.6795705, 0.0, 0.0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("anchor, interpolation", [("paper", "linear"), ("recompute", "loglinear")])
def test_loss_is_areals_loss_with_the_approximated_prox(anchor, interpolation):
    # recompute, minibatch j = 1 of n = 2: α = (1/2)/(d + 1/2) = [·, 1, 1/3, 1/5, 1/9].
    # paper + linear: π_prox = α·π_behave + (1 − α)·π_θ with α = [·, 0, 1, 1/2, 1/4]:
    #   d=2: log(e^-3/2 + e^-1/2) = -1.5662192;  d=4: log(e^-0.5/4 + 3e^-2.1/4) = -1.4127411.
    alpha = {"paper": torch.tensor([0, 0, 1, 1 / 2, 1 / 4]), "recompute": torch.tensor([0, 1, 1 / 3, 1 / 5, 1 / 9])}[anchor]
    if interpolation == "loglinear":
        prox = THETA + alpha * (BEHAVE - THETA)
    else:
        prox = torch.tensor([-7.0, -1.5, -2.0, -1.5662192, -1.4127411])
    got, expected = (THETA.clone().requires_grad_(True) for _ in range(2))
    a3po = A3POConfig(anchor=anchor, interpolation=interpolation)
    loss = a3po_loss_fn(got, torch.zeros(5), _batch(), a3po=a3po, minibatch=1, n_minibatches=2, current_version=K, **AREAL_KW)
    ref = grpo_loss_fn(
        expected, torch.zeros(5), _batch(prox_logp=prox), current_version=K, prox_logp_method="recompute", **AREAL_KW
    )
    (loss + ref).backward()
    assert loss.item() != 0.0
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.grad, expected.grad, rtol=0, atol=1e-6)


def test_fallback_mode_trains_on_the_recomputed_prox():
    # With AReaL's recomputed π_prox in the batch, the loss is AReaL's on it only in fallback mode.
    truth = torch.tensor([-7.0, -1.4, -1.3, -2.2, -1.9])
    args = dict(minibatch=0, n_minibatches=1, current_version=K, **AREAL_KW)
    losses = {
        use_truth: a3po_loss_fn(THETA, torch.zeros(5), _batch(prox_logp=truth), a3po=A3POConfig(), step_audit=StepAudit(use_truth=use_truth), **args)
        for use_truth in (False, True)
    }
    areal = grpo_loss_fn(THETA, torch.zeros(5), _batch(prox_logp=truth), current_version=K, prox_logp_method="recompute", **AREAL_KW)
    assert losses[True].item() == areal.item()
    assert losses[False].item() != areal.item()


def test_non_finite_theta_on_a_generated_token_is_named():
    theta = THETA.clone()
    theta[3] = math.nan
    theta[0] = math.inf  # a prompt token: not counted
    with pytest.raises(FloatingPointError, match=r"is NaN/Inf on 1 generated token\(s\) in minibatch 1: the model has diverged"):
        a3po_loss_fn(theta, torch.zeros(5), _batch(), a3po=A3POConfig(), minibatch=1, n_minibatches=2, current_version=K, **AREAL_KW)


def test_loss_without_versions_is_named():
    with pytest.raises(KeyError, match=r"needs the per-token 'versions' tensor in the batch \(loss function\)"):
        a3po_loss_fn(THETA, torch.zeros(5), dict(logprobs=BEHAVE, loss_mask=LOSS_MASK, advantages=ADVANTAGES),
                     a3po=A3POConfig(), minibatch=0, n_minibatches=1, current_version=K, **AREAL_KW)


def test_tag_check_counts_current_tokens_whose_behaviour_gap_is_above_the_engine_mismatch():
    # Minibatch 0: π_θ is the policy at the trainer's version, so a d = 0 token's log π_behave must equal
    # log π_θ up to the engine mismatch. Token 1 (d = 0, log π_behave = -1.0): log π_θ -1.5 (gap 0.5,
    # a token of another version), then -1.0 + 5e-7 (a float32 engine's mismatch); then minibatch 1,
    # where π_θ has moved and nothing is checked. The other tokens (d > 0) are never checked.
    from areal.utils import stats_tracker

    from areal_a3po.loss import TAG_CHECK_GAP

    stats_tracker.export_all()
    args = dict(a3po=A3POConfig(), n_minibatches=2, current_version=K, **AREAL_KW)
    for minibatch, theta_1 in ((0, -1.5), (0, -1.0 + 5e-7), (1, -1.5)):
        theta = THETA.clone()
        theta[1] = theta_1
        a3po_loss_fn(theta, torch.zeros(5), _batch(), minibatch=minibatch, **args)
    stats = {k[len("a3po/tag_check/"):]: v for k, v in stats_tracker.export_all().items() if k.startswith("a3po/tag_check/")}
    assert stats == pytest.approx({"tokens": 2.0, "suspect_tokens": 1.0, "behave_gap/avg": (0.5 + 5e-7) / 2,
                                   "behave_gap/min": 5e-7, "behave_gap/max": 0.5}, abs=1e-7)
    assert 5e-7 * 1000 < TAG_CHECK_GAP < 0.05  # far above the float32 mismatch, below one version's drift


class _Recorder:
    def __init__(self, device: str = "cpu"):
        self.calls = []
        self.device = torch.device(device)  # AReaL's engines compute on engine.device

    def train_batch(self, input_, loss_fn, loss_weight_fn):
        self.calls.append(loss_fn)
        return {"n": len(self.calls)}

    other_attribute = "the engine's"


def test_engine_view_numbers_minibatches_and_passes_areals_arguments_on():
    engine, a3po, audit = _Recorder(), A3POConfig(anchor="recompute"), StepAudit(use_truth=False)
    view = A3POUpdateEngine(engine, a3po, 2, audit)
    areal_loss = functools.partial(grpo_loss_fn, current_version=K, prox_logp_method="a3po", **AREAL_KW)
    assert view.train_batch({}, loss_fn=areal_loss, loss_weight_fn=None) == {"n": 1}
    view.train_batch({}, loss_fn=areal_loss, loss_weight_fn=None)
    assert view.other_attribute == "the engine's"
    for j, fn in enumerate(engine.calls):
        assert fn.func is a3po_loss_fn
        assert fn.keywords == {**areal_loss.keywords, "a3po": a3po, "minibatch": j, "n_minibatches": 2, "step_audit": audit}
    with pytest.raises(RuntimeError, match=r"PPO update ran more minibatches than actor\.ppo_n_minibatches=2\."):
        view.train_batch({}, loss_fn=areal_loss, loss_weight_fn=None)


def test_an_audited_minibatch_without_a_loss_call_still_logs_its_audit_keys():
    # AReaL skips the loss of a micro-batch whose tokens are all masked; on an audited step this rank
    # must still log minibatch j's audit keys (with no token), or the ranks' stats export does not pair up.
    from areal.utils import stats_tracker

    stats_tracker.export_all()
    view = A3POUpdateEngine(_Recorder(), A3POConfig(max_staleness=1), 2, StepAudit(use_truth=False, audited=True))
    areal_loss = functools.partial(grpo_loss_fn, current_version=K, prox_logp_method="a3po", **AREAL_KW)
    view.train_batch({}, loss_fn=areal_loss, loss_weight_fn=None)  # the recorder never calls the loss
    stats = stats_tracker.export_all()
    # Every audit key of minibatch 0 is there with 0 tokens; the averages of no token are left out by the export.
    assert stats == {f"a3po/audit/{b}tokens": 0.0 for b in ("", "minibatch_0/", "staleness_0/", "staleness_1/", "staleness_gt_1/")}


def test_an_empty_minibatchs_audit_keys_are_on_the_engines_device(monkeypatch):
    # AReaL's export reduces each key over the data-parallel group on the device it was recorded on, and
    # NCCL refuses a CPU tensor: the keys of a minibatch this rank never trained on must be on the engine's
    # device, as the loss's own are. "meta" stands for a device that is not the CPU.
    from collections import defaultdict

    from areal.utils import stats_tracker

    tracker = stats_tracker.DEFAULT_TRACKER
    for name, empty in (("stats", defaultdict(list)), ("denominators", {}), ("reduce_types", {})):
        monkeypatch.setattr(tracker, name, empty)  # a fresh tracker for this test, restored after it
    view = A3POUpdateEngine(_Recorder("meta"), A3POConfig(max_staleness=1), 2, StepAudit(use_truth=False, audited=True))
    areal_loss = functools.partial(grpo_loss_fn, current_version=K, prox_logp_method="a3po", **AREAL_KW)
    view.train_batch({}, loss_fn=areal_loss, loss_weight_fn=None)
    devices = {key: {t.device.type for t in values} for key, values in tracker.stats.items()}
    assert "a3po/audit/staleness_gt_1/tokens" in devices and len(devices) > 20
    assert {key: kinds for key, kinds in devices.items() if kinds != {"meta"}} == {}


def test_engine_view_refuses_a_loss_it_does_not_know():
    view = A3POUpdateEngine(_Recorder(), A3POConfig(), 1, StepAudit(use_truth=False))
    with pytest.raises(RuntimeError, match=r"expected PPOActor\._ppo_update to pass functools\.partial\(grpo_loss_fn, \.\.\.\) to train_batch.*: AReaL \S+'s update is not the one the plugin hooks into \(tested: AReaL 1\.0\.4 and 2\.0\.0\)"):
        view.train_batch({}, loss_fn=lambda *a: None, loss_weight_fn=None)


# --- The actor's batch preparation, on AReaL's FSDP actor ---


def _trajectory(prompt: int, response_versions: list[int], seed: int) -> dict:
    """One trajectory as RLVRWorkflow returns it (int32 ids/loss_mask/versions, [1, n])."""
    n = prompt + len(response_versions)
    g = torch.Generator().manual_seed(seed)
    loss_mask = torch.zeros(1, n, dtype=torch.int32)
    loss_mask[0, prompt:] = 1
    versions = torch.full((1, n), -1, dtype=torch.int32)
    versions[0, prompt:] = torch.tensor(response_versions, dtype=torch.int32)
    return dict(
        input_ids=torch.randint(3, 40, (1, n), generator=g, dtype=torch.int32),
        attention_mask=torch.ones(1, n, dtype=torch.bool),
        loss_mask=loss_mask,
        logprobs=-torch.rand(1, n, generator=g) * loss_mask,
        versions=versions,
        rewards=torch.tensor([1.0 if seed % 2 else -1.0]),
    )


@pytest.mark.integration
def test_compute_advantages_label_aligns_versions_and_keeps_areals(tiny_model):
    # Label position t holds the logprob of token t+1, so its version must be that of token t+1:
    # versions rolled by -1 like AReaL rolls logprobs and loss_mask. AReaL's own versions are kept
    # as they were, also for the short row with a one-token prompt that AReaL pads next to the long one.
    long, short = _trajectory(5, [1, 1, 2, 2, 3, 3, 3], seed=0), _trajectory(1, [2, 2, 3], seed=1)
    from benchmarks.harness.actor import make_actor

    actor = make_actor(tiny_model, prox_logp_method="a3po", max_tokens_per_mb=12)
    actor.set_version(3)
    out = actor.compute_advantages([long, short])
    assert out[0]["versions"][0].tolist() == [-1, -1, -1, -1, 1, 1, 2, 2, 3, 3, 3, -1]
    assert out[0]["loss_mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0]
    assert out[0][AREAL_VERSIONS_KEY][0].tolist() == [-1, -1, -1, -1, -1, 1, 1, 2, 2, 3, 3, 3]
    assert out[1]["versions"][0, :3].tolist() == [2, 2, 3] and out[1]["loss_mask"][0].tolist() == [1, 1, 1, 0]
    assert out[1][AREAL_VERSIONS_KEY][0].tolist() == [-1, 2, 2, 3]
