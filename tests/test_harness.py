"""The in-process harness's pieces, checked by hand: the variant registry, the stale streams, the loop."""

from types import SimpleNamespace

import pytest
import torch

from benchmarks.harness import variants as registry
from benchmarks.harness.streams import Rollout

# --- the variant registry ---------------------------------------------------------------------

EXPECTED = {  # name -> (make_actor options, Hydra overrides), written out by hand
    "recompute": ({"prox_logp_method": "recompute"}, ["actor.prox_logp_method=recompute"]),
    "areal-loglinear": ({"prox_logp_method": "loglinear"}, ["actor.prox_logp_method=loglinear"]),
    "a3po-paper": ({"prox_logp_method": "a3po", "anchor": "paper"}, ["actor.prox_logp_method=a3po", "actor.a3po.anchor=paper"]),
    "a3po-recompute": (
        {"prox_logp_method": "a3po", "anchor": "recompute"},
        ["actor.prox_logp_method=a3po", "actor.a3po.anchor=recompute"],
    ),
    "sync (on-policy)": (
        {"prox_logp_method": "recompute"},
        ["actor.prox_logp_method=recompute", "rollout.max_head_offpolicyness=0"],
    ),
}


def test_registry_gives_each_variant_its_actor_options_and_overrides():
    assert list(registry.VARIANTS) == list(EXPECTED)
    for name, (options, overrides) in EXPECTED.items():
        v = registry.get(name)
        assert v.name == name and v.actor_options() == options and v.overrides() == overrides
        assert v.a3po == (options["prox_logp_method"] == "a3po")
        assert v.staleness(4) == (0 if name == registry.REFERENCE else 4)
    for group in (registry.COMPARED, registry.DEMO, registry.LEARNING):
        assert set(group) <= set(registry.VARIANTS) - {registry.REFERENCE}
    with pytest.raises(ValueError, match=r"unknown variant 'a3po'; choose one of \['recompute'"):
        registry.get("a3po")
    with pytest.raises(ValueError, match="anchor"):
        registry.Variant("x", "a3po")
    with pytest.raises(ValueError, match="anchor"):
        registry.Variant("x", "recompute", "paper")


def test_registry_overrides_load_in_the_plugins_config():
    from areal_a3po.config import load_config

    for v in registry.VARIANTS.values():
        config, _ = load_config(["--config", "configs/gsm8k_a3po.yaml", *v.overrides()])
        assert config.actor.prox_logp_method == v.prox_logp_method, v.name
        if v.a3po:
            assert config.actor.a3po.anchor == v.anchor
        if v.on_policy:
            assert config.rollout.max_head_offpolicyness == 0


def test_apply_switches_an_actor_config_and_with_it_the_recompute_phase():
    from areal_a3po.config import A3POActorConfig

    config = A3POActorConfig(experiment_name="x", trial_name="t", path="p", use_decoupled_loss=True, prox_logp_method="a3po")
    config.a3po.anchor = "recompute"
    registry.get("recompute").apply(config)
    assert (config.prox_logp_method, config.a3po.anchor, config.should_compute_prox_logp()) == ("recompute", "paper", True)
    registry.get("a3po-recompute").apply(config)
    assert (config.prox_logp_method, config.a3po.anchor, config.should_compute_prox_logp()) == ("a3po", "recompute", False)
    registry.get("areal-loglinear").apply(config)
    assert (config.prox_logp_method, config.should_compute_prox_logp()) == ("loglinear", False)
    plain = SimpleNamespace(prox_logp_method="recompute")  # AReaL's own config has no a3po block
    registry.get("a3po-paper").apply(plain)
    assert plain.prox_logp_method == "a3po"


# --- Rollout and the tasks ---------------------------------------------------------------------


def test_rollout_trajectories_have_the_engines_dtypes_and_lengths():
    ids = torch.arange(8).view(2, 4)
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    versions = torch.tensor([[-1, -1, 3, 3], [-1, 4, 5, 5]])
    logp = torch.tensor([[0, 0, -1, -2], [0, -3, -4, -5]], dtype=torch.float64)
    rollout = Rollout(ids, mask, versions, logp, torch.tensor([1, 0]), lengths=[4, 3])
    a, b = rollout.trajectories()
    for t in (a, b):
        assert {k: v.dtype for k, v in t.items()} == dict(
            input_ids=torch.int32, attention_mask=torch.bool, loss_mask=torch.int32, logprobs=torch.float32,
            versions=torch.int32, rewards=torch.float32,
        )
    assert a["input_ids"].tolist() == [[0, 1, 2, 3]] and b["input_ids"].tolist() == [[4, 5, 6]]  # cut to 3
    assert b["versions"].tolist() == [[-1, 4, 5]] and b["logprobs"].tolist() == [[0, -3, -4]]
    assert b["attention_mask"].shape == (1, 3) and a["rewards"].tolist() == [1.0]
    # at step 5: d = 2, 2 (row 0); 1, 0, 0 (row 1, its whole length: lengths do not enter) -> 5/5
    assert rollout.mean_staleness(5) == 1.0
    assert Rollout(ids, mask, versions, logp, torch.zeros(2)).mean_staleness(6) == 2.0  # 3, 3; 2, 1, 1


def test_learning_reward_by_hand():
    from benchmarks.harness.models import BOS_ID, VOCAB
    from benchmarks.harness.tasks import digit_share, token_reward as reward

    t = lambda *tokens: torch.tensor([[VOCAB.index(x) for x in tokens]])  # noqa: E731
    prompt = torch.cat([torch.tensor([[BOS_ID]]), t("3", "7", "=")], dim=1)  # target: the digits reversed, 7 3
    assert reward(prompt, t("7", "3")).item() == 1.0
    # 5 is 2 away from 7: 1 - 2/9 = 0.7778; 3 exact: 1 -> mean 0.8889
    assert reward(prompt, t("5", "3")).item() == pytest.approx((1 - 2 / 9 + 1) / 2, abs=1e-6)
    assert reward(prompt, t("a", "3")).item() == 0.5  # a non-digit scores 0
    assert reward(prompt, t("0", "9")).item() == pytest.approx((1 - 7 / 9 + 1 - 6 / 9) / 2, abs=1e-6)
    assert digit_share(t("a", "3", "=", "0")).item() == 0.5


# --- the stale streams (real actor and sampler on the toy model) ------------------------------

T, PROMPT = 12, 4


@pytest.fixture(scope="module")
def actor(tiny_model):
    from benchmarks.harness.actor import make_actor

    return make_actor(tiny_model, max_tokens_per_mb=T)


def _snapshots(actor, n):
    """``n`` distinct weight vectors: the actor's, then perturbed copies (versions 0..n-1)."""
    from benchmarks.harness.actor import parameters

    w0, g = parameters(actor), torch.Generator().manual_seed(1)
    return [w0] + [w0 + 0.05 * torch.randn(w0.shape, generator=g, dtype=w0.dtype) for _ in range(n - 1)]


@pytest.mark.integration
def test_scored_stream_versions_switches_and_logprobs(actor):
    from benchmarks.harness.actor import load_parameters, parameters
    from benchmarks.harness.streams import ScoredStream, token_logprobs

    own = parameters(actor)
    snapshots = _snapshots(actor, 3)
    stream = ScoredStream(actor, snapshots, n_seqs=8, seq_len=T, prompt_len=PROMPT, max_staleness=2, seed=0)
    r = stream.batch(2)
    assert r.input_ids.shape == r.versions.shape == r.logprobs.shape == r.loss_mask.shape == (8, T)
    assert (r.versions[:, :PROMPT] == -1).all() and (r.loss_mask[:, :PROMPT] == 0).all() and (r.loss_mask[:, PROMPT:] == 1).all()
    half = (PROMPT + T) // 2
    for i, row in enumerate(r.versions.tolist()):
        v = row[PROMPT]
        assert 0 <= v <= 2
        switch = i % 2 == 1 and v < 2  # odd rows pick up the next version mid-response
        assert row[PROMPT:half] == [v] * (half - PROMPT)
        assert row[half:] == [v + switch] * (T - half)
    assert any(i % 2 == 1 and row[PROMPT] < row[-1] for i, row in enumerate(r.versions.tolist()))  # a switch happened
    # each token's logprob is the snapshot of its own version's, as the engine reports it; 0 on the prompt
    assert (r.logprobs[:, :PROMPT] == 0).all()
    for v in range(3):
        load_parameters(actor, snapshots[v])
        expected = token_logprobs(actor, r.input_ids)
        here = r.versions == v
        assert torch.equal(r.logprobs[here], expected[here]), v
    load_parameters(actor, own)
    # reproducible per step; the rewards are coin flips
    again = stream.batch(2)
    assert torch.equal(again.input_ids, r.input_ids) and torch.equal(again.logprobs, r.logprobs)
    assert set(r.rewards.tolist()) <= {0.0, 1.0}
    assert (stream.batch(0).versions[:, PROMPT:] == 0).all()  # at step 0 nothing is stale


@pytest.mark.integration
def test_noisy_stream_and_noisy_rollout(actor):
    from benchmarks.harness.streams import NoisyStream, noisy_rollout, random_tokens, token_logprobs

    exact = NoisyStream(actor, n_seqs=6, seq_len=T, prompt_len=PROMPT, max_staleness=3, seed=2, noise=0.0)
    r = exact.batch(5)
    assert torch.equal(r.logprobs, token_logprobs(actor, r.input_ids) * r.loss_mask)
    d = 5 - r.versions[:, PROMPT:]
    assert ((d >= 0) & (d <= 3)).all() and (d == d[:, :1]).all()  # one version per sequence
    assert (r.versions[:, :PROMPT] == -1).all()
    # the generator is carried from batch to batch: two streams of the same seed give the same batches
    a = NoisyStream(actor, n_seqs=6, seq_len=T, prompt_len=PROMPT, max_staleness=3, seed=2)
    b = NoisyStream(actor, n_seqs=6, seq_len=T, prompt_len=PROMPT, max_staleness=3, seed=2)
    first, second = [a.batch(s) for s in (3, 4)], [b.batch(s) for s in (3, 4)]
    assert all(torch.equal(x.logprobs, y.logprobs) and torch.equal(x.versions, y.versions) for x, y in zip(first, second))
    noise = first[0].logprobs - token_logprobs(actor, first[0].input_ids) * first[0].loss_mask
    assert (noise[:, :PROMPT] == 0).all() and 0.05 < noise[:, PROMPT:].std() < 0.2  # noise 0.1 on generated tokens
    # the one-batch form (the tests' stale batches)
    ids, mask = random_tokens(3, T, PROMPT, seed=0)
    versions = torch.where(mask.bool(), 0, -1)
    one = noisy_rollout(actor, ids, mask, versions, torch.ones(3), noise=0.0, generator=torch.Generator(), lengths=[T, T - 2, T])
    assert torch.equal(one.logprobs, token_logprobs(actor, ids) * mask)
    assert [t["input_ids"].shape[1] for t in one.trajectories()] == [T, T - 2, T]


@pytest.mark.integration
def test_sampled_stream_groups_versions_and_logprobs(tiny_model, actor):
    from benchmarks.harness.streams import SampledStream, Sampler, random_prompts
    from benchmarks.harness.tasks import digit_share

    sampler = Sampler(tiny_model)
    snapshots = _snapshots(actor, 3)
    reward = lambda prompts, responses: digit_share(responses)  # noqa: E731
    stream = SampledStream(sampler, snapshots, prompts=random_prompts(4, PROMPT), new_tokens=3, reward=reward, group=3,
                           max_staleness=2, generator=torch.Generator().manual_seed(0))
    r = stream.batch(2)
    assert r.input_ids.shape == (12, PROMPT + 3) and r.input_ids.dtype == torch.long
    assert (r.versions[:, :PROMPT] == -1).all() and (r.loss_mask[:, PROMPT:] == 1).all() and (r.loss_mask[:, :PROMPT] == 0).all()
    for p in range(4):  # a group: one prompt, one version, 3 samples
        rows = slice(3 * p, 3 * p + 3)
        assert (r.input_ids[rows, :PROMPT] == r.input_ids[3 * p, :PROMPT]).all()
        assert (r.versions[rows, PROMPT:] == r.versions[3 * p, PROMPT]).all() and 0 <= r.versions[3 * p, PROMPT] <= 2
    assert torch.equal(r.rewards, digit_share(r.input_ids[:, PROMPT:]))
    # each response token's logprob is log π_v(token | prefix) under its version's snapshot
    for v in r.versions[:, PROMPT].unique().tolist():
        rows = r.versions[:, PROMPT] == v
        sampler.load(snapshots[v])
        with torch.no_grad():
            logp = torch.log_softmax(sampler.model(input_ids=r.input_ids[rows]).logits.float(), dim=-1)
        expected = logp[:, PROMPT - 1 : -1].gather(-1, r.input_ids[rows, PROMPT:, None]).squeeze(-1)
        torch.testing.assert_close(r.logprobs[rows, PROMPT:], expected, rtol=0, atol=1e-5)
    assert (r.logprobs[:, :PROMPT] == 0).all()
    # a fixed staleness draws nothing: prompts and samples come straight from the call's generator
    fixed = SampledStream(sampler, snapshots, prompts=random_prompts(4, PROMPT), new_tokens=3, reward=reward, seed=100)
    got = fixed.batch(2, staleness=1, seed=7)
    g = torch.Generator().manual_seed(7)
    prompts = torch.randint(3, 43, (4, PROMPT), generator=g)
    sampler.load(snapshots[1])
    ids, logprobs = sampler.sample(prompts, 3, generator=g)
    assert torch.equal(got.input_ids, ids) and torch.equal(got.logprobs, logprobs) and (got.versions[:, PROMPT:] == 1).all()
    assert torch.equal(fixed.batch(1, staleness=0).input_ids, fixed.batch(1, staleness=0).input_ids)  # seed + step
    with pytest.raises(ValueError, match="either a generator"):
        SampledStream(sampler, snapshots, prompts=random_prompts(4, PROMPT), new_tokens=3, reward=reward)


# --- the interleaved loop -----------------------------------------------------------------------


class _Counted:
    """A stream that counts its batches."""

    def __init__(self, stream):
        self.stream, self.calls = stream, []

    def batch(self, step):
        self.calls.append(step)
        return self.stream.batch(step)


@pytest.mark.integration
def test_loop_records_per_variant_actors_with_ground_truth_and_evaluation(tiny_model):
    from benchmarks.harness.actor import make_actor, parameters
    from benchmarks.harness.loop import Lane, by_lane, run_interleaved
    from benchmarks.harness.streams import ScoredStream

    scorer = make_actor(tiny_model, max_tokens_per_mb=T)
    lanes = []
    for name in ("recompute", "a3po-paper"):
        v = registry.get(name)
        a = make_actor(tiny_model, **v.actor_options(), max_tokens_per_mb=T, lr=1e-2)
        snapshots = [parameters(a)]
        stream = ScoredStream(scorer, snapshots, n_seqs=4, seq_len=T, prompt_len=PROMPT, max_staleness=2, seed=0)
        lanes.append(Lane(name, a, stream, v, snapshots))
    evaluated = []
    records = run_interleaved(lanes, 3, ground_truth=True, evaluate=lambda lane: evaluated.append(lane.name) or len(evaluated),
                              eval_at=lambda version: version % 2 == 0)
    assert [(r.step, r.lane) for r in records] == [(s, n) for s in range(3) for n in ("recompute", "a3po-paper")]
    rec, a3po = by_lane(records).values()
    assert [r.recompute_forwards for r in rec] == [1, 1, 1] and all("recompute_logp" in r.timings for r in rec)
    assert not any(r.audited or r.ground_truth for r in rec)
    # the ground truth is computed outside the timed step: the a3po step runs no forward, yet is audited
    assert [r.recompute_forwards for r in a3po] == [0, 0, 0] and not any("recompute_logp" in r.timings for r in a3po)
    assert all(r.audited and r.ground_truth for r in a3po) and a3po[0].audit("abs_error/avg") == 0.0  # step 0: d = 0
    assert all(r.total == sum(r.timings.values()) > 0 for r in records)
    # evaluation after the step reaching version 2 only, per lane, in run order
    assert evaluated == ["recompute", "a3po-paper"] and [r.eval_reward for r in a3po] == [None, 2, None]
    for lane, rows in zip(lanes, (rec, a3po)):
        assert len(lane.snapshots) == 4 and lane.actor.get_version() == 3
        for before, after, r in zip(lane.snapshots, lane.snapshots[1:], rows):
            assert r.grad_norm == 0 or not torch.equal(before, after)  # a snapshot per version, after its update
        assert any(r.grad_norm > 0 for r in rows)
    assert all(r.staleness == lane.stream.batch(r.step).mean_staleness(r.step) for lane, rows in zip(lanes, (rec, a3po)) for r in rows)


@pytest.mark.integration
def test_loop_shared_actor_and_stream_rotated(tiny_model):
    from benchmarks.harness.actor import make_actor
    from benchmarks.harness.loop import Lane, run_interleaved
    from benchmarks.harness.streams import NoisyStream

    actor = make_actor(tiny_model, prox_logp_method="a3po", max_tokens_per_mb=T)
    stream = _Counted(NoisyStream(actor, n_seqs=2, seq_len=T, prompt_len=PROMPT, max_staleness=2, seed=0))
    names = ("recompute", "a3po-paper", "areal-loglinear")
    lanes = [Lane(n, actor, stream, registry.get(n)) for n in names]
    records = run_interleaved(lanes, 3, rotate=True)
    assert stream.calls == [0, 1, 2]  # one batch per step, shared by the variants
    assert [r.lane for r in records] == [*names, *names[1:], names[0], names[2], *names[:2]]
    # the variant is switched on the one actor before each step: only recompute's step recomputes
    assert all(r.recompute_forwards == (r.lane == "recompute") for r in records)
    assert all(("recompute_logp" in r.timings) == (r.lane == "recompute") for r in records)
    assert "forward_batch" not in vars(actor)  # the forward counter is gone after each step


def test_median_after_warmup_skips_each_lanes_first_step():
    from benchmarks.harness.loop import StepRecord, by_lane, median_after_warmup

    def rec(lane, step, seconds):
        return StepRecord(lane=lane, step=step, timings={"train_step": seconds}, recompute_forwards=0, audited=False,
                          stats={}, reward=0.0, staleness=0.0)

    records = [rec("a", 0, 10.0), rec("b", 0, 0.5), rec("a", 1, 1.0), rec("b", 1, 0.7), rec("a", 2, 3.0), rec("a", 3, 2.0)]
    lanes = by_lane(records)
    assert list(lanes) == ["a", "b"] and [r.step for r in lanes["a"]] == [0, 1, 2, 3]
    assert median_after_warmup(lanes["a"]) == 2.0  # median of 1, 3, 2: the 10 s warm-up left out
    assert median_after_warmup(lanes["b"]) == 0.7
    assert median_after_warmup(lanes["a"][:1]) == 10.0  # a single step is all there is
    assert rec("a", 0, 1.0).audit("abs_error/avg") == 0.0 and rec("a", 0, 1.0).grad_norm == 0.0


def test_groups_intact_reads_every_row_of_each_trajectory_dict():
    # AReaL's loop hands a prompt's samples over as one dict of n_samples rows: the check must look at
    # each row's prompt, not only at the first row of each dict (which compared different prompts).
    import torch

    from benchmarks.harness.ranks import groups_intact

    def group(prompt: list[int], n: int) -> dict:
        ids = torch.tensor([prompt + [9, 9]] * n)
        versions = torch.tensor([[-1] * len(prompt) + [3, 3]] * n)
        return dict(input_ids=ids, versions=versions)

    assert groups_intact([group([1, 2], 2), group([5, 6], 2)], 2)  # two prompts, two samples each
    assert groups_intact([group([1, 2], 1), group([1, 2], 1), group([5, 6], 2)], 2)  # one row per dict
    assert not groups_intact([group([1, 2], 1), group([5, 6], 2), group([1, 2], 1)], 2)  # a group split across prompts
