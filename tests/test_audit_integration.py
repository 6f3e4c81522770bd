"""Audit, fallback and bad-input checks of the plugin's actor, on the real FSDP actor on CPU."""

import math
import warnings

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
    recompute_update,
    stale_rollout,
)

from areal_a3po.actor import STATE_FILE, A3POWarning
from benchmarks.harness.actor import load_parameters, make_actor, parameters

pytestmark = pytest.mark.integration
PREFIX = "ppo_actor/update/a3po/audit/"


def _stats_of_update(actor, trajs, version):
    """One step at ``version``; returns (exported stats, model forwards run)."""
    calls = []
    handle = actor.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        stats = exported_stats(lambda: a3po_update(actor, trajs, version=version))
    finally:
        handle.remove()
    return stats, len(calls)


@pytest.mark.parametrize("anchor", ["paper", "recompute"])
def test_audit_interval_logs_the_errors_computed_here(tiny_model, anchor):
    # audit_interval 2: version 4 is audited (its own recompute forward), version 5 is not.
    # One minibatch, so π_θ = recomputed π_prox =: p. Per generated token, with the paper's α:
    #   approx â = p + α(b − p); abs error |â − p|; behaviour-weight error |e^(â−b) − e^(p−b)|;
    #   ratio error |e^(p−â) − 1|; kl e^(â−p) − 1 − (â−p); clip: r = e^(p−â) vs r = 1 (never clipped).
    # anchor 'recompute' has α = 0 at j = 0: every error is exactly 0.
    version = 4
    versions = mixed_versions() + 1  # the K = 3 pattern shifted to k = 4: staleness 0..3
    versions[versions == 0] = -1
    actor = make_actor(tiny_model, prox_logp_method="a3po", anchor=anchor, max_tokens_per_mb=T, a3po_options={"audit_interval": 2})
    rollout = stale_rollout(actor, versions)
    trajs = rollout.trajectories()
    p = torch.cat(actor.compute_logp(trajs), dim=0)  # what the audit's forward will compute
    stats, forwards = _stats_of_update(actor, trajs, version)
    assert forwards == 2 * B  # the audit forward + the update forward

    tokens = torch.roll(rollout.loss_mask, -1, dims=-1).bool()
    b = torch.roll(rollout.logprobs, -1, dims=-1)
    aligned = torch.roll(versions, -1, dims=-1)
    d = (version - aligned).double()
    alpha = torch.where(tokens & (aligned >= 0) & (d >= 1), 1.0 / d.clamp(min=1), 0.0) if anchor == "paper" else torch.zeros(B, T)
    a = (p + alpha * (b - p))
    e = (a - p).double()
    expected = {
        "abs_error": e.abs(),
        "behave_imp_weight_abs_error": (torch.exp(a - b) - torch.exp(p - b)).abs(),
        "importance_weight_abs_error": (torch.exp(p - a) - 1).abs(),
        "kl": torch.expm1(e) - e,
    }
    for name, value in expected.items():
        got = stats[PREFIX + f"{name}/avg"]
        assert got == pytest.approx(value[tokens].mean().item(), rel=1e-4, abs=1e-6), name
    assert stats[PREFIX + "max_abs_error"] == pytest.approx(e.abs()[tokens].max().item(), rel=1e-4, abs=1e-6)
    assert stats[PREFIX + "tokens"] == tokens.sum().item() == 28
    if anchor == "recompute":
        assert stats[PREFIX + "max_abs_error"] == 0.0 and stats[PREFIX + "kl/max"] == 0.0
    else:
        assert stats[PREFIX + "abs_error/avg"] > 1e-3
        # per staleness: d = 0 tokens have α = 0 -> no error; d = 3 (row 3, 7 tokens)
        assert stats[PREFIX + "staleness_0/abs_error/max"] == 0.0
        d3 = tokens & (d == 3)
        assert stats[PREFIX + "staleness_3/tokens"] == d3.sum().item() == 7
        assert stats[PREFIX + "staleness_3/abs_error/avg"] == pytest.approx(e.abs()[d3].mean().item(), rel=1e-4)
        # the behaviour gap |log π_behave − log π_prox| on the same tokens
        assert stats[PREFIX + "staleness_3/behave_gap/avg"] == pytest.approx((b - p).abs()[d3].mean().item(), rel=1e-4)
        assert stats[PREFIX + "staleness_3/anchor_recompute/abs_error/avg"] == 0.0  # exact with one minibatch
    # the comparisons are logged on the same tokens
    other = "recompute" if anchor == "paper" else "paper"
    assert (PREFIX + f"anchor_{other}/abs_error/avg") in stats
    assert stats[PREFIX + "areal_loglinear/abs_error/avg"] > 0.0  # AReaL assumes v_prox = k − 1
    # AReaL 2.0's reuse_train_logp (π_prox = the loss's π_θ, detached): with one minibatch π_θ is π at
    # version k, the recomputed π_prox, so its error is 0 (to the last bit: the same forward's values).
    assert stats[PREFIX + "areal_reuse_train_logp/abs_error/max"] == 0.0

    stats, forwards = _stats_of_update(actor, stale_rollout(actor, versions + 1, seed=5).trajectories(), version + 1)
    assert forwards == B and not any(k.startswith(PREFIX) for k in stats)


def test_areal_loglinear_audit_is_areals_own_formula_on_its_unaligned_versions(tiny_model):
    # AReaL's loglinear keys label position t on its *unaligned* versions[t] (the version of token t,
    # not of the token t+1 whose logprob is there). Row 2 of the engine batch has a one-token prompt
    # and is shorter than rows 0 and 3, so AReaL pads it: its position 0 (trained, predicts the first
    # response token) has AReaL version -1, so α = 0 and AReaL's π̂ = π_behave there. AReaL's α is
    # (k − 1 − v)/(k − v) clamped to [0, 1] (0 for v < 0 or v = k), computed here by its own function.
    from areal.trainer.ppo.actor import compute_prox_logp_approximations

    actor = make_actor(tiny_model, prox_logp_method="a3po", max_tokens_per_mb=T, a3po_options={"audit_interval": 1})
    rollout = engine_rollout(actor)
    trajs = rollout.trajectories()
    p = actor.compute_logp(trajs)  # the audit's recomputed π_prox, and π_θ of the single minibatch
    stats = exported_stats(lambda: a3po_update(actor, trajs))

    behave, mask, aligned = (label_aligned(rollout, key) for key in ("logprobs", "loss_mask", "versions"))
    errors, d = [], []
    for i, traj in enumerate(trajs):
        areal = compute_prox_logp_approximations(
            old_logp=behave[i], logprobs=p[i], versions=traj["versions"], current_version=K, method="loglinear"
        )["loglinear"]
        tokens = mask[i].bool() & (aligned[i] >= 0)
        errors.append((areal - p[i]).abs()[tokens])
        d.append((K - aligned[i])[tokens])
    errors, d = torch.cat(errors), torch.cat(d)
    assert trajs[2]["versions"][0, 0] == -1 and aligned[2][0, 0] == 2  # the edge token: AReaL α = 0
    assert stats[PREFIX + "areal_loglinear/abs_error/avg"] == pytest.approx(errors.mean().item(), rel=1e-5)
    assert stats[PREFIX + "areal_loglinear/abs_error/max"] == pytest.approx(errors.max().item(), rel=1e-5)
    assert stats[PREFIX + "staleness_1/areal_loglinear/abs_error/avg"] == pytest.approx(errors[d == 1].mean().item(), rel=1e-5)


def test_fallback_switches_on_drift_keeps_its_mode_through_a_checkpoint_and_recovers(tiny_model, tmp_path):
    from areal.api.io_struct import SaveLoadMeta

    # Planted drift: lr 0.1 on the tiny model, 2 minibatches. Minibatch 1's π_θ is far from π_k,
    # so even anchor 'recompute' (exact in minibatch 0) is off by far more than the threshold.
    opts = dict(prox_logp_method="a3po", anchor="recompute", ppo_n_minibatches=2, lr=1e-1, max_tokens_per_mb=T)
    fallback = {"metric": "abs_error", "threshold": 1e-3, "patience": 1, "recover_after": 1}
    actor = make_actor(tiny_model, **opts, a3po_options={"audit_interval": 1, "fallback": fallback})
    with pytest.warns(A3POWarning, match=r"A-3PO fallback at step 3: audited abs_error=.* exceeded actor\.a3po\.fallback\.threshold=0\.001 on 1 audit"):
        stats, _ = _stats_of_update(actor, stale_rollout(actor, mixed_versions()).trajectories(), 3)
    assert stats[PREFIX + "fallback_abs_error"] > 1e-3
    assert stats["ppo_actor/update/a3po/recompute_mode"] == 0.0  # the bad step itself trained on the approximation
    assert actor.actor.fallback.mode == "recompute"

    # Save (AReaL's recover format, DCP + optimizer) and resume into a fresh actor: same mode.
    meta = SaveLoadMeta(path=str(tmp_path / "ckpt"), weight_format="dcp", with_optim=True)
    actor.save(meta)
    assert (tmp_path / "ckpt" / STATE_FILE).exists()
    resumed = make_actor(tiny_model, **opts, a3po_options={"audit_interval": 1, "fallback": fallback})
    assert resumed.actor.fallback.mode == "approximate"
    resumed.load(meta)
    assert resumed.actor.fallback.mode == "recompute"
    assert torch.equal(parameters(resumed), parameters(actor))

    # In recompute mode the step is AReaL's recompute, exactly. The batch is one the approximation
    # gets right (v = k, π_behave = π_k: anchor 'recompute' is exact in both minibatches), so this
    # audit is clean and recover_after = 1 returns to the approximation.
    current = torch.full((B, T), -1)
    current[:, PROMPT:] = 4
    rollout = stale_rollout(resumed, current, noise=0.0, seed=7)
    ref = make_actor(tiny_model, plugin=False, ppo_n_minibatches=2, lr=1e-1, max_tokens_per_mb=T)
    ref.load(meta)
    with pytest.warns(A3POWarning, match=r"A-3PO recovered at step 4"):
        stats, forwards = _stats_of_update(resumed, rollout.trajectories(), 4)
    assert stats["ppo_actor/update/a3po/recompute_mode"] == 1.0 and forwards == 2 * B
    assert stats[PREFIX + "fallback_abs_error"] <= 1e-3
    assert resumed.actor.fallback.mode == "approximate"
    recompute_update(ref, rollout, version=4)
    assert (parameters(resumed) - parameters(ref)).abs().max().item() <= 1e-6


def test_a_failed_state_write_keeps_the_last_state_and_a_missing_one_is_named(tiny_model, tmp_path):
    from areal.api.io_struct import SaveLoadMeta

    fallback = {"metric": "abs_error", "threshold": 1e-3}
    actor = make_actor(tiny_model, prox_logp_method="a3po", max_tokens_per_mb=T, a3po_options={"audit_interval": 1, "fallback": fallback})
    actor.actor.fallback.mode = "recompute"
    meta = SaveLoadMeta(path=str(tmp_path / "ckpt"), weight_format="dcp", with_optim=True)
    actor.save(meta)
    # A save that fails while writing the state (here: a lone surrogate, which fails in the file's
    # write after the temporary file exists) leaves the last state whole.
    good = actor.actor.state_dict
    actor.actor.state_dict = lambda: {"fallback": {**good()["fallback"], "mode": "approximate", "note": "\ud800"}}
    with pytest.raises(UnicodeEncodeError, match="surrogates not allowed"):
        actor.save(meta)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".a3po_state")) == []
    actor.actor.state_dict = good
    # The Saver's Hugging Face export (for evaluation and serving) gets no A-3PO state.
    actor.save(SaveLoadMeta(path=str(tmp_path / "hf"), weight_format="hf", with_optim=False, tokenizer=None))
    assert (tmp_path / "hf" / "config.json").exists() and not (tmp_path / "hf" / STATE_FILE).exists()
    resumed = make_actor(tiny_model, prox_logp_method="a3po", max_tokens_per_mb=T, a3po_options={"audit_interval": 1, "fallback": fallback})
    resumed.load(meta)
    assert resumed.actor.fallback.mode == "recompute"
    # A checkpoint without the state (a run without a3po wrote it, or the file is lost) is said, not guessed silently.
    (tmp_path / "ckpt" / STATE_FILE).unlink()
    fresh = make_actor(tiny_model, prox_logp_method="a3po", max_tokens_per_mb=T, a3po_options={"audit_interval": 1, "fallback": fallback})
    with pytest.warns(A3POWarning, match=rf"the checkpoint .*ckpt has no {STATE_FILE} .* it resumes in 'approximate' mode"):
        fresh.load(meta)


def _trajs(actor, versions=None):
    return stale_rollout(actor, mixed_versions() if versions is None else versions).trajectories()


@pytest.fixture(scope="module")
def checker(tiny_model):
    """One actor for the checks that fail before anything changes (compute_advantages only)."""
    return make_actor(tiny_model, prox_logp_method="a3po", max_tokens_per_mb=T)


def _advantages(actor, trajs, version=K):
    actor.set_version(version)
    return actor.compute_advantages(trajs)


def test_nan_behaviour_logprob_on_a_generated_token_is_named(checker):
    trajs = _trajs(checker)
    trajs[2]["logprobs"][0, PROMPT + 1] = math.nan
    with pytest.raises(ValueError, match=r"behaviour logprobs \('logprobs' from the inference engine\) are NaN/Inf on 1 generated token"):
        _advantages(checker, trajs)
    trajs[2]["logprobs"][0, PROMPT + 1] = -math.inf
    with pytest.raises(ValueError, match="NaN/Inf on 1 generated token"):
        _advantages(checker, trajs)


def test_nan_on_prompt_tokens_is_ignored(tiny_model):
    actor = make_actor(tiny_model, prox_logp_method="a3po", max_tokens_per_mb=T)
    trajs = _trajs(actor)
    trajs[0]["logprobs"][0, 1] = math.nan  # a prompt token: loss_mask 0 there
    before = parameters(actor)
    _stats_of_update(actor, trajs, K)
    after = parameters(actor)
    assert torch.isfinite(after).all() and (after - before).abs().max().item() > 1e-5


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (lambda t: t.update(versions=t["versions"].float()), TypeError, r"'versions' must be an integer tensor .* got dtype torch\.float32 in the trajectory 1; convert it in the workflow with versions\.long\(\)"),
        (lambda t: t.update(versions=t["versions"][:, :-1]), ValueError, r"'versions' must have the shape of 'logprobs' \(1, 12\) \(one weight version per token\), got \(1, 11\) in the trajectory 1"),
        (lambda t: t["versions"].__setitem__((0, PROMPT + 2), -1), ValueError, r"1 generated token\(s\) \(loss_mask=1\) have a negative 'versions' entry"),
        (lambda t: t["versions"].__setitem__((0, PROMPT + 2), K + 1), ValueError, r"1 generated token\(s\) have 'versions' newer than the trainer's version 3 \(v > k\)"),
    ],
    ids=["float-dtype", "shape", "negative", "newer"],
)
def test_bad_versions_are_named(checker, edit, error, message):
    trajs = _trajs(checker)
    edit(trajs[1])
    with pytest.raises(error, match=message):
        _advantages(checker, trajs)


def test_all_masked_batch_is_named(checker):
    trajs = _trajs(checker)
    for t in trajs:
        t["loss_mask"].zero_()
    with pytest.raises(ValueError, match=r"every token of this batch is masked \('loss_mask' has no 1"):
        _advantages(checker, trajs)


def test_staleness_beyond_the_limit_warns_once_and_goes_on(tiny_model):
    # mixed_versions has d = 3 at k = 3; the limit is 2 -> one warning, then silence.
    checker = make_actor(tiny_model, prox_logp_method="a3po", max_tokens_per_mb=T, a3po_options={"max_staleness": 2})
    with pytest.warns(A3POWarning, match=r"tokens with staleness 3 > 2 \(actor\.a3po\.max_staleness"):
        _advantages(checker, _trajs(checker))
    with warnings.catch_warnings():
        warnings.simplefilter("error", A3POWarning)
        _advantages(checker, _trajs(checker))


def test_diverged_model_is_named_not_trained_on(tiny_model):
    actor = make_actor(tiny_model, prox_logp_method="a3po", max_tokens_per_mb=T)
    trajs = _trajs(actor)
    load_parameters(actor, torch.full_like(parameters(actor), math.nan))
    with pytest.raises(FloatingPointError, match=r"log π_θ .* is NaN/Inf on \d+ generated token\(s\) in minibatch 0: the model has diverged"):
        _stats_of_update(actor, trajs, K)


def test_half_precision_behaviour_logprobs_train_like_float32(tiny_model):
    # AReaL's own loss stats reject bf16 logprobs; the plugin upcasts them once, so a bf16 batch
    # trains exactly like the same values in float32.
    results = []
    rollout = None
    for dtype in (torch.bfloat16, torch.float32):
        actor = make_actor(tiny_model, prox_logp_method="a3po", max_tokens_per_mb=T)
        rollout = rollout or stale_rollout(actor, mixed_versions())
        trajs = rollout.trajectories()
        for t in trajs:
            t["logprobs"] = t["logprobs"].to(torch.bfloat16).to(dtype)
        _stats_of_update(actor, trajs, K)
        results.append(parameters(actor))
    assert torch.equal(results[0], results[1])
