"""The plugin's actor against AReaL's own recompute path, on the real FSDP actor on CPU.

Each test builds fresh actors from the same tiny Qwen2, so they start from identical weights and
fresh optimizers, feeds them the same stale batch, runs one ``ppo_update`` and compares weights.
"""

import pytest
import torch

from benchmarks.harness.actor import make_actor, parameters
from benchmarks.harness.streams import Rollout, random_tokens, token_logprobs

pytestmark = pytest.mark.integration

B, T, PROMPT = 4, 12, 5
K = 3  # trainer version during the step


def stale_rollout(reference_actor, versions: torch.Tensor, *, noise: float = 0.3, seed: int = 0) -> Rollout:
    """Behaviour logprobs = the model's own token logprobs + noise (a stand-in for older weights)."""
    ids, loss_mask = random_tokens(B, T, PROMPT, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    logp = token_logprobs(reference_actor, ids)
    behave = (logp + noise * torch.randn(B, T, generator=g)) * loss_mask
    rewards = torch.tensor([1.0, -1.0, 0.5, -0.5])  # every sequence has an advantage
    return Rollout(ids, loss_mask, versions, behave, rewards)


def mixed_versions() -> torch.Tensor:
    """Per-token versions at k = 3, prompt = -1; row 1's response switches version mid-way."""
    v = torch.full((B, T), -1)
    v[0, PROMPT:] = 3  # d = 0
    v[1, PROMPT:8] = 1  # d = 2 ...
    v[1, 8:] = 2  # ... then d = 1 from token 8 on
    v[2, PROMPT:] = 2  # d = 1
    v[3, PROMPT:] = 0  # d = 3
    return v


def recompute_update(actor, rollout: Rollout, prox_logp: torch.Tensor | None = None, *, version: int = K) -> None:
    """AReaL's recompute path: π_prox from the forward pass, or the given label-aligned tensor."""
    trajs = rollout.trajectories()
    prox = actor.compute_logp(trajs) if prox_logp is None else [p[None] for p in prox_logp]
    for traj, p in zip(trajs, prox):
        traj["prox_logp"] = p
    actor.set_version(version)
    actor.ppo_update(actor.compute_advantages(trajs))


def a3po_update(actor, rollout: Rollout) -> None:
    actor.set_version(K)
    actor.ppo_update(actor.compute_advantages(rollout.trajectories()))


def paper_prox(theta_label: torch.Tensor, rollout: Rollout, versions_label: torch.Tensor) -> torch.Tensor:
    """The paper's formula written out here, independently of the plugin: d = k - v,
    log π_prox = (1/d)·log π_behave + (1 - 1/d)·log π_θ for d ≥ 1, log π_θ for d = 0."""
    behave_label = torch.roll(rollout.logprobs, -1, dims=-1)
    mask_label = torch.roll(rollout.loss_mask, -1, dims=-1).bool()
    d = (K - versions_label).double()
    alpha = torch.where(mask_label & (versions_label >= 0) & (d >= 1), 1.0 / d.clamp(min=1), 0.0)
    return (alpha * behave_label + (1 - alpha) * theta_label).float()


def test_recompute_anchor_one_minibatch_equals_areal_recompute(tiny_model):
    ref = make_actor(tiny_model, plugin=False, max_tokens_per_mb=T)
    rollout = stale_rollout(ref, mixed_versions())
    before = parameters(ref)
    recompute_update(ref, rollout)

    a3po = make_actor(tiny_model, prox_logp_method="a3po", anchor="recompute", max_tokens_per_mb=T)
    assert torch.equal(parameters(a3po), before)
    a3po_update(a3po, rollout)

    moved = (parameters(ref) - before).abs().max().item()
    assert moved > 1e-4  # the update did something
    assert (parameters(a3po) - parameters(ref)).abs().max().item() <= 1e-6


def test_recompute_anchor_is_exact_in_later_minibatches_when_behaviour_is_current(tiny_model):
    # v = k and π_behave = π at version k: anchor 'recompute' gives π_prox = π_k in every minibatch
    # (j = 0: α = 0, π_θ = π_k; j = 1: α = (1/2)/(0 + 1/2) = 1, π_behave = π_k), so two minibatches
    # must reproduce AReaL's recompute update. The paper anchor (π_prox = π_θ at d = 0) must not:
    # π_prox cancels in (π_prox/π_behave)·(π_θ/π_prox) and acts only through the clip, so the
    # step is made large (lr) and the clip tight (eps_clip) for minibatch 1 to be clipped.
    versions = torch.full((B, T), -1)
    versions[:, PROMPT:] = K
    hot = dict(ppo_n_minibatches=2, max_tokens_per_mb=T, lr=1e-2, eps_clip=0.02)
    ref = make_actor(tiny_model, plugin=False, **hot)
    rollout = stale_rollout(ref, versions, noise=0.0)
    before = parameters(ref)
    recompute_update(ref, rollout)

    results = {}
    for anchor in ("recompute", "paper"):
        actor = make_actor(tiny_model, prox_logp_method="a3po", anchor=anchor, **hot)
        a3po_update(actor, rollout)
        results[anchor] = (parameters(actor) - parameters(ref)).abs().max().item()
    assert results["recompute"] <= 1e-6
    assert results["paper"] > 1e-5, results
    assert (parameters(ref) - before).abs().max().item() > 1e-4


def test_paper_anchor_equals_areal_recompute_fed_with_the_paper_formula(tiny_model):
    ref = make_actor(tiny_model, plugin=False, max_tokens_per_mb=T)
    versions = mixed_versions()
    rollout = stale_rollout(ref, versions)
    theta = torch.cat(ref.compute_logp(rollout.trajectories()), dim=0)  # π_θ at j = 0 (n = 1)
    aligned = torch.roll(versions, -1, dims=-1)
    prox = paper_prox(theta, rollout, aligned)
    recompute_update(ref, rollout, prox_logp=prox)

    a3po = make_actor(tiny_model, prox_logp_method="a3po", anchor="paper", max_tokens_per_mb=T)
    a3po_update(a3po, rollout)
    assert (parameters(a3po) - parameters(ref)).abs().max().item() <= 1e-6

    # The alignment matters: AReaL's unrolled versions (one token off) give a different π_prox at
    # the version switch of row 1, and a different update.
    misaligned = make_actor(tiny_model, plugin=False, max_tokens_per_mb=T)
    recompute_update(misaligned, rollout, prox_logp=paper_prox(theta, rollout, versions))
    assert (parameters(misaligned) - parameters(ref)).abs().max().item() > 1e-6


def test_a3po_runs_no_recompute_forward(tiny_model):
    from benchmarks.harness.actor import train_step

    counts = {}
    for method in ("recompute", "a3po"):
        actor = make_actor(tiny_model, prox_logp_method=method, max_tokens_per_mb=T)
        trajs = stale_rollout(actor, mixed_versions()).trajectories()
        calls = []
        handle = actor.model.register_forward_hook(lambda *_: calls.append(1))
        train_step(actor, trajs, version=K)
        handle.remove()
        counts[method] = len(calls)
    # One model forward per sequence (one sequence per micro-batch) and pass:
    # recompute = recompute pass + update pass, a3po = update pass only.
    assert counts == {"recompute": 2 * B, "a3po": B}


def test_a3po_metrics_reach_stats_tracker(tiny_model):
    from areal.utils import stats_tracker

    stats_tracker.export_all()  # start from an empty tracker
    actor = make_actor(tiny_model, prox_logp_method="a3po", anchor="paper", max_tokens_per_mb=T)
    a3po_update(actor, stale_rollout(actor, mixed_versions()))
    stats = stats_tracker.export_all()
    # generated tokens after label alignment: each row has T - PROMPT = 7, now at positions
    # PROMPT-1 .. T-2 (position t predicts token t+1) -> 4 * 7 = 28
    assert stats["ppo_actor/update/a3po/a3po_tokens"] == 28
    # staleness per token: row0 6x d=0; row1 v=1 for 2 tokens (label positions 5,6 -> tokens 6,7)...
    assert stats["ppo_actor/update/a3po/staleness/max"] == 3.0
    assert stats["ppo_actor/update/a3po/staleness/min"] == 0.0
    assert 0.0 <= stats["ppo_actor/update/a3po/alpha/avg"] <= 1.0
    assert stats["ppo_actor/update/a3po/alpha/max"] == 1.0  # d = 1 tokens
    for key in ("behave_imp_weight", "importance_weight"):
        assert f"ppo_actor/update/a3po/{key}/avg" in stats


def test_missing_versions_is_a_clear_error(tiny_model):
    actor = make_actor(tiny_model, prox_logp_method="a3po", max_tokens_per_mb=T)
    trajs = stale_rollout(actor, mixed_versions()).trajectories()
    for traj in trajs:
        del traj["versions"]
    with pytest.raises(KeyError, match="needs the per-token 'versions' tensor"):
        actor.compute_advantages(trajs)


def test_other_methods_behave_exactly_like_areal(tiny_model):
    # prox_logp_method=loglinear through the plugin's actor == AReaL's actor, weights bit for bit.
    rollout = None
    params = []
    for plugin in (False, True):
        actor = make_actor(tiny_model, prox_logp_method="loglinear", plugin=plugin, max_tokens_per_mb=T)
        rollout = rollout or stale_rollout(actor, mixed_versions())
        a3po_update(actor, rollout)
        params.append(parameters(actor))
    assert torch.equal(params[0], params[1])


@pytest.mark.parametrize("anchor", ["paper", "recompute"])
def test_audit_error_equals_the_error_computed_here(tiny_model, anchor):
    # With a recomputed π_prox in the batch, a3po logs |approx - recomputed|. One minibatch, so
    # π_θ = recomputed π_prox: anchor 'recompute' is exact (error 0), 'paper' is off by
    # |paper formula - π_θ| = α·|log π_behave - log π_θ| on each token.
    from areal.utils import stats_tracker

    actor = make_actor(tiny_model, prox_logp_method="a3po", anchor=anchor, max_tokens_per_mb=T)
    versions = mixed_versions()
    rollout = stale_rollout(actor, versions)
    trajs = rollout.trajectories()
    truth = actor.compute_logp(trajs)
    for traj, p in zip(trajs, truth):
        traj["prox_logp"] = p
    theta = torch.cat(truth, dim=0)
    stats_tracker.export_all()
    actor.set_version(K)
    actor.ppo_update(actor.compute_advantages(trajs))
    stats = stats_tracker.export_all()

    tokens = torch.roll(rollout.loss_mask, -1, dims=-1).bool()
    expected = (paper_prox(theta, rollout, torch.roll(versions, -1, dims=-1)) - theta).abs()[tokens]
    if anchor == "recompute":
        assert stats["ppo_actor/update/a3po/audit/abs_error/max"] == 0.0
    else:
        assert expected.mean().item() > 1e-3
        assert stats["ppo_actor/update/a3po/audit/abs_error/avg"] == pytest.approx(expected.mean().item(), rel=1e-5)
        assert stats["ppo_actor/update/a3po/audit/abs_error/max"] == pytest.approx(expected.max().item(), rel=1e-5)
