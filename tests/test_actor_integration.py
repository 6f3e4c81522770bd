"""The plugin's actor against AReaL's own actor, on the real FSDP actor on CPU.

Each test builds fresh actors from the same tiny Qwen2, so they start from identical weights and
fresh optimizers, feeds them the same stale batch, runs one update and compares weights. The
engine-shaped batch (``helpers.engine_rollout``) has rows of different lengths (AReaL pads them),
int32 ids/loss_mask/versions, several version switches inside one response and a one-token prompt.
"""

import pytest
import torch
from helpers import (
    B,
    K,
    PROMPT,
    T,
    a3po_update,
    engine_rollout,
    exported_stats,
    label_aligned,
    mixed_versions,
    paper_prox,
    recompute_update,
    stale_rollout,
)

from benchmarks.harness.actor import make_actor, parameters, train_step

pytestmark = pytest.mark.integration


def test_engine_batch_is_shaped_like_the_rlvr_workflows(tiny_model):
    # The batch the comparisons below use: what RLVRWorkflow returns, before AReaL pads it.
    trajs = engine_rollout(make_actor(tiny_model, plugin=False, max_tokens_per_mb=T)).trajectories()
    assert [t["input_ids"].shape[1] for t in trajs] == [12, 9, 7, 12]
    for key in ("input_ids", "loss_mask", "versions"):
        assert {t[key].dtype for t in trajs} == {torch.int32}, key
    assert trajs[0]["versions"][0, 5:].tolist() == [1, 1, 2, 2, 3, 3, 3]
    assert trajs[2]["loss_mask"][0].tolist() == [0, 1, 1, 1, 1, 1, 1]  # one-token prompt


def test_recompute_anchor_one_minibatch_equals_areal_recompute(tiny_model):
    # One minibatch: anchor 'recompute' has α = 0, π_prox = π_θ = π at version k, which is what
    # AReaL's recompute forward returns; a wrong anchor (paper: α = 1/d on stale tokens) moves
    # the weights elsewhere.
    ref = make_actor(tiny_model, plugin=False, max_tokens_per_mb=T)
    rollout = engine_rollout(ref)
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
    rollout = engine_rollout(ref)
    theta = ref.compute_logp(rollout.trajectories())  # π_θ at j = 0 (n = 1), one [1, n_i] per row
    recompute_update(ref, rollout, prox_logp=paper_prox(theta, rollout, label_aligned(rollout, "versions")))

    a3po = make_actor(tiny_model, prox_logp_method="a3po", anchor="paper", max_tokens_per_mb=T)
    a3po_update(a3po, rollout)
    assert (parameters(a3po) - parameters(ref)).abs().max().item() <= 1e-6

    # The alignment matters: AReaL's unrolled versions (one token off) give a different π_prox at
    # every version switch, and a different update.
    misaligned = make_actor(tiny_model, plugin=False, max_tokens_per_mb=T)
    unaligned = [t["versions"] for t in rollout.trajectories()]
    recompute_update(misaligned, rollout, prox_logp=paper_prox(theta, rollout, unaligned))
    assert (parameters(misaligned) - parameters(ref)).abs().max().item() > 1e-6


def test_a3po_runs_no_recompute_forward(tiny_model):
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
    actor = make_actor(tiny_model, prox_logp_method="a3po", anchor="paper", max_tokens_per_mb=T)
    rollout = stale_rollout(actor, mixed_versions())
    stats = exported_stats(lambda: a3po_update(actor, rollout))
    # generated tokens after label alignment: each row has T - PROMPT = 7, now at positions
    # PROMPT-1 .. T-2 (position t predicts token t+1) -> 4 * 7 = 28
    assert stats["ppo_actor/update/a3po/a3po_tokens"] == 28
    # staleness per token: row 0 d = 0, row 1 d = 2 then 1, row 2 d = 1, row 3 d = 3
    assert stats["ppo_actor/update/a3po/staleness/max"] == 3.0
    assert stats["ppo_actor/update/a3po/staleness/min"] == 0.0
    # mean d = (7·0 + 3·2 + 4·1 + 7·1 + 7·3) / 28 = 38/28 (row 1: v = 1 on tokens 5..7, v = 2 on 8..11)
    assert stats["ppo_actor/update/a3po/staleness/avg"] == pytest.approx(38 / 28, rel=1e-6)
    # mean α = (7·0 + 3·(1/2) + 4·1 + 7·1 + 7·(1/3)) / 28 = (1.5 + 11 + 7/3) / 28 = 14.8333/28
    assert stats["ppo_actor/update/a3po/alpha/avg"] == pytest.approx((1.5 + 11 + 7 / 3) / 28, rel=1e-6)
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


@pytest.mark.parametrize("method", ["recompute", "loglinear", "metrics"])
def test_areal_methods_through_the_plugin_equal_areals_own_actor(tiny_model, method):
    # Any prox_logp_method but a3po: the plugin's actor is AReaL's, call for call. Two trainer steps
    # (recompute forward where the method needs one), then weights bit for bit and every stat
    # AReaL logged (but wall-clock times) equal.
    results = []
    for plugin in (False, True):
        actor = make_actor(tiny_model, prox_logp_method=method, plugin=plugin, max_tokens_per_mb=T)
        rollouts = [engine_rollout(actor, seed=0), engine_rollout(actor, seed=1)]
        stats = {}
        for step, rollout in enumerate(rollouts):
            logged = exported_stats(lambda: train_step(actor, rollout.trajectories(), version=K + step))
            stats.update({f"{step}/{k}": v for k, v in logged.items() if "timeperf" not in k})
        results.append((parameters(actor), stats))
    (areal_weights, areal_stats), (plugin_weights, plugin_stats) = results
    assert torch.equal(areal_weights, plugin_weights)
    assert plugin_stats.keys() == areal_stats.keys() and not any("a3po" in k for k in plugin_stats)
    assert plugin_stats == pytest.approx(areal_stats, rel=0, abs=0, nan_ok=True)


@pytest.mark.parametrize("anchor", ["paper", "recompute"])
def test_audit_error_equals_the_error_computed_here(tiny_model, anchor):
    # With a recomputed π_prox in the batch, a3po logs |approx - recomputed|. One minibatch, so
    # π_θ = recomputed π_prox: anchor 'recompute' is exact (error 0), 'paper' is off by
    # |paper formula - π_θ| = α·|log π_behave - log π_θ| on each token.
    actor = make_actor(tiny_model, prox_logp_method="a3po", anchor=anchor, max_tokens_per_mb=T)
    rollout = engine_rollout(actor)
    trajs = rollout.trajectories()
    truth = actor.compute_logp(trajs)
    for traj, p in zip(trajs, truth):
        traj["prox_logp"] = p
    stats = exported_stats(lambda: a3po_update(actor, trajs))

    tokens = torch.cat([m.bool() & (v >= 0) for m, v in zip(label_aligned(rollout, "loss_mask"), label_aligned(rollout, "versions"))], -1)
    approx = torch.cat(paper_prox(truth, rollout, label_aligned(rollout, "versions")), -1)
    expected = (approx - torch.cat(truth, -1)).abs()[tokens]
    assert stats["ppo_actor/update/a3po/audit/tokens"] == tokens.sum().item() == 27  # 7 + 6 + 6 + 8
    if anchor == "recompute":
        assert stats["ppo_actor/update/a3po/audit/abs_error/max"] == 0.0
    else:
        assert expected.mean().item() > 1e-3
        assert stats["ppo_actor/update/a3po/audit/abs_error/avg"] == pytest.approx(expected.mean().item(), rel=1e-5)
        assert stats["ppo_actor/update/a3po/audit/abs_error/max"] == pytest.approx(expected.max().item(), rel=1e-5)

