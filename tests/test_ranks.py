"""Two trainer ranks: every rank decides alike, raises alike, logs once, and AReaL's stats export holds.

Each test runs two fresh processes over gloo (``helpers.run_ranks``): a rank that hangs in a
collective or dies (gloo aborts on a collective mismatch) fails the test within its timeout
instead of hanging it. The first tests drive the plugin's pieces with ``torch.distributed`` alone;
the last runs two of AReaL's FSDP actors, one per rank, on shards that differ as a real
data-parallel step's do.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import K, PROMPT, T, Raised, a3po_update, run_ranks, stale_rollout

from areal_a3po.audit import AuditInputs, audit_report, log_audit_report

# --- AReaL's stats export of the audit, with a different staleness set on each rank ---

STALENESS_LIMIT = 2  # buckets staleness_0, staleness_1, staleness_2, staleness_gt_2


def _audit_inputs(rank: int) -> AuditInputs:
    # rank 0: 3 tokens with d = 0, 1, 1 (and a masked one); rank 1: 4 tokens with d = 1, 2, 2, 5.
    # The ranks' staleness sets differ: {0, 1} against {1, 2, >2}.
    if rank == 0:
        p, a, d, tokens = [-1.0, -2.0, -3.0, -4.0], [-1.0, -1.5, -3.5, 50.0], [0, 1, 1, 2], [True, True, True, False]
    else:
        p, a, d, tokens = [-0.5, -1.0, -2.0, -3.0], [-0.75, -1.0, -1.0, -6.0], [1, 2, 2, 5], [True, True, True, True]
    p = torch.tensor(p)
    return AuditInputs(
        approx=torch.tensor(a), others={"anchor_recompute": p.clone()}, truth=p, behave=p - 0.1, theta=p.clone(),
        advantages=torch.tensor([1.0, -1.0, 1.0, -1.0]), tokens=torch.tensor(tokens), staleness=torch.tensor(d),
        minibatch=0, eps_clip=0.2, staleness_limit=STALENESS_LIMIT,
    )


def _log_and_export(rank: int, world: int) -> dict[str, float]:
    import torch.distributed as dist
    from areal.utils import stats_tracker

    dist.init_process_group("gloo")
    with stats_tracker.scope("a3po"):
        log_audit_report(audit_report(_audit_inputs(rank)))
    return stats_tracker.export_all(reduce_group=dist.group.WORLD)  # what AReaL's FSDP engine calls, over its dp group


def test_audit_export_with_different_staleness_on_each_rank_is_the_whole_batchs():
    from areal.utils import stats_tracker

    ranks = run_ranks(_log_and_export, timeout=120)
    # One process logging both shards (two micro-batches of one batch) and exporting them.
    stats_tracker.export_all()
    with stats_tracker.scope("a3po"):
        for r in (0, 1):
            log_audit_report(audit_report(_audit_inputs(r)))
    whole = stats_tracker.export_all()
    assert ranks[0] == ranks[1]
    assert set(ranks[0]) == set(whole)
    for key, value in whole.items():
        assert ranks[0][key] == pytest.approx(value, abs=1e-6), key
    # By hand: |â − p| is [0, .5, .5] on rank 0 and [.25, 0, 1, 3] on rank 1.
    # d = 1: rank 0's two .5 and rank 1's .25 -> (.5 + .5 + .25) / 3; d > 2: rank 1's 3 alone.
    assert whole["a3po/audit/staleness_1/tokens"] == 3.0
    assert whole["a3po/audit/staleness_1/abs_error/avg"] == pytest.approx(1.25 / 3, abs=1e-6)
    assert whole["a3po/audit/staleness_gt_2/abs_error/avg"] == pytest.approx(3.0, abs=1e-6)
    assert whole["a3po/audit/abs_error/avg"] == pytest.approx((0 + 0.5 + 0.5 + 0.25 + 0 + 1 + 3) / 7, abs=1e-6)


# --- One error on every rank ---


def _agree(rank: int, world: int, bad_rank: int | None) -> object:
    import torch.distributed as dist

    from areal_a3po.batch import BatchCounts, agree_on_batch

    dist.init_process_group("gloo")
    mine = BatchCounts(tokens=5 + rank, nonfinite_behave=0, negative_versions=0, newer_versions=0, max_staleness=rank + 1)
    error = TypeError("'versions' must be an integer tensor") if rank == bad_rank else None
    return agree_on_batch(None if error else mine, error)


def test_an_error_on_one_rank_is_raised_on_every_rank():
    assert run_ranks(_agree, 1, timeout=120) == [Raised("TypeError", "'versions' must be an integer tensor [rank 1 of 2; every rank stops]")] * 2


def _raise_on_rank_one(rank: int, world: int, error: BaseException) -> object:
    import torch.distributed as dist

    from areal_a3po.ranks import raise_together

    dist.init_process_group("gloo")
    raise_together(error if rank == 1 else None)
    return "went on"


def test_an_error_whose_type_takes_other_arguments_is_raised_everywhere_named():
    # UnicodeDecodeError's constructor takes five arguments: it cannot be rebuilt from its message.
    error = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    out = run_ranks(_raise_on_rank_one, error, timeout=120)
    expected = "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte [rank 1 of 2; every rank stops]"
    assert out == [Raised("RuntimeError", expected)] * 2


def test_the_device_of_a_backends_collectives():
    import torch.distributed as dist

    from areal_a3po.ranks import collective_device_type

    # NCCL refuses CPU tensors; AReaL's NPU platform communicates over HCCL, registered for the NPU.
    assert [collective_device_type(b) for b in ("gloo", "nccl", "xccl", "mpi")] == ["cpu", "cuda", "xpu", "cpu"]
    dist.Backend.register_backend("a3pofakehccl", lambda *a: None, devices=["npu"])
    assert collective_device_type("a3pofakehccl") == "npu"
    with pytest.raises(ValueError, match=r"backend 'nope' is not registered with torch\.distributed"):
        collective_device_type("nope")


def test_ranks_agree_on_the_groups_counts():
    from areal_a3po.batch import BatchCounts

    # tokens 5 + 6, the larger staleness of 1 and 2
    expected = BatchCounts(tokens=11, nonfinite_behave=0, negative_versions=0, newer_versions=0, max_staleness=2)
    assert run_ranks(_agree, None, timeout=120) == [expected, expected]


# --- The checkpoint's A-3PO state ---


def _load(rank: int, world: int, folders: list[str]) -> object:
    import torch.distributed as dist

    from areal_a3po.checkpoint import load_state

    dist.init_process_group("gloo")
    return load_state(folders[rank])


def test_rank_zero_reads_the_state_for_every_rank(tmp_path):
    # Rank 1 cannot see the file (a node-local disk): it resumes in rank 0's mode all the same.
    shared, local = tmp_path / "rank0", tmp_path / "rank1"
    shared.mkdir()
    local.mkdir()
    (shared / "a3po_state.json").write_text(json.dumps({"fallback": {"mode": "recompute"}}))
    assert run_ranks(_load, [str(shared), str(local)], timeout=120) == [{"fallback": {"mode": "recompute"}}] * 2


@pytest.mark.parametrize("content", [b'{"fallback": {"mo', b"\x80\x04\x95binary"], ids=["cut short", "binary"])
def test_an_unreadable_state_is_the_same_error_on_every_rank(tmp_path, content):
    (tmp_path / "a3po_state.json").write_bytes(content)
    out = run_ranks(_load, [str(tmp_path)] * 2, timeout=120)
    assert out[0] == out[1] and out[0].type == "ValueError"
    assert "a3po_state.json is not valid JSON" in out[0].message and out[0].message.endswith("[rank 0 of 2; every rank stops]")


def test_a_failed_write_leaves_the_previous_state(tmp_path):
    from areal_a3po.checkpoint import save_state

    save_state(str(tmp_path), {"fallback": {"mode": "recompute"}})
    # A lone surrogate passes json.dumps and fails in the write itself, inside write_atomically,
    # after the temporary file exists (as a full disk would).
    with pytest.raises(UnicodeEncodeError, match="surrogates not allowed"):
        save_state(str(tmp_path), {"fallback": {"mode": "approximate", "note": "\ud800"}})
    assert json.loads((tmp_path / "a3po_state.json").read_text()) == {"fallback": {"mode": "recompute"}}
    assert os.listdir(tmp_path) == ["a3po_state.json"]  # the temporary file was removed


def test_a_failed_rename_removes_the_temporary_file(tmp_path):
    from areal_a3po.checkpoint import write_atomically

    target = tmp_path / "a3po_state.json"
    target.mkdir()  # os.replace cannot put a file over a folder: the last step fails
    with pytest.raises(OSError):
        write_atomically(str(target), "{}")
    assert os.listdir(tmp_path) == ["a3po_state.json"] and target.is_dir()


# --- Two FSDP actors, one per rank ---


def _versions(rank: int) -> torch.Tensor:
    """Rank 0's shard holds d = 0 and 1, rank 1's d = 2 and 3 (at K = 3): different staleness sets."""
    v = torch.full((4, T), -1)
    v[:, PROMPT:] = torch.tensor([3, 2, 2, 3] if rank == 0 else [1, 0, 1, 0])[:, None]
    return v


def _two_actors(rank: int, world: int, model: str) -> dict:
    """The scenarios in order; each rank reports what it saw (a stage that hangs fails the test)."""
    import warnings

    from areal.utils import stats_tracker

    from areal_a3po.actor import A3POWarning
    from benchmarks.harness.actor import make_actor, parameters

    actor = make_actor(
        model, prox_logp_method="a3po", anchor="paper", max_tokens_per_mb=T, data_parallel_size=world,
        a3po_options={"audit_interval": 1, "max_staleness": 2, "fallback": {"threshold": 0.0, "patience": 1}},
    )
    group = actor.data_parallel_group
    seen: dict = {}

    # 1. A stale step, audited: AReaL's export over the dp group, the fallback's switch, the warnings.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", A3POWarning)
        a3po_update(actor, stale_rollout(actor, _versions(rank), seed=rank).trajectories(), version=K)
        stats = stats_tracker.export_all(reduce_group=group)
    seen["stats"] = {k: v for k, v in stats.items() if "/a3po/" in k}
    seen["mode"] = actor.actor.fallback.mode
    seen["warnings"] = [str(w.message) for w in caught if issubclass(w.category, A3POWarning)]

    # 2. A bad shard on rank 1 only: NaN behaviour logprob on a generated token, then float versions.
    trajs = stale_rollout(actor, _versions(rank), seed=rank).trajectories()
    if rank == 1:
        trajs[2]["logprobs"][0, PROMPT + 1] = math.nan
    seen["nan_behaviour"] = _raised(lambda: actor.compute_advantages(trajs))
    trajs = stale_rollout(actor, _versions(rank), seed=rank).trajectories()
    if rank == 1:
        trajs[1]["versions"] = trajs[1]["versions"].float()
    seen["float_versions"] = _raised(lambda: actor.compute_advantages(trajs))
    #    An error no check of ours foresees, from AReaL's own compute_advantages: a custom workflow's
    #    reward of the wrong shape on rank 1 (torch's RuntimeError from the reward normalisation).
    trajs = stale_rollout(actor, _versions(rank), seed=rank).trajectories()
    if rank == 1:
        trajs[1]["rewards"] = torch.tensor([1.0, 2.0])
    seen["unforeseen"] = _raised(lambda: actor.compute_advantages(trajs))

    # 3. Rank 1's shard entirely masked: AReaL would skip its loss, and with it all its update stats.
    trajs = stale_rollout(actor, _versions(rank), seed=rank).trajectories()
    if rank == 1:
        for t in trajs:
            t["loss_mask"].zero_()
    before = parameters(actor)
    seen["masked_shard"] = _raised(lambda: a3po_update(actor, trajs, version=K + 1))
    seen["masked_shard_unchanged"] = bool(torch.equal(parameters(actor), before))
    stats_tracker.export_all(reduce_group=group)

    # 4. log π_θ NaN on rank 1 only (its model's output): both ranks stop after the minibatch.
    trajs = stale_rollout(actor, _versions(rank), seed=rank).trajectories()  # finite behaviour logprobs on both
    if rank == 1:
        actor.model.register_forward_hook(_nan_logits)
    seen["nan_theta"] = _raised(lambda: a3po_update(actor, trajs, version=K + 2))

    # 5. The plugin's part of the loss fails on rank 1 only (a CUDA out-of-memory in π_prox or the audit,
    #    say; planted in the plugin's own function): both ranks raise it after the minibatch, none waits.
    import areal_a3po.loss as loss

    actor.model._forward_hooks.clear()
    trajs = stale_rollout(actor, _versions(rank), seed=rank).trajectories()
    if rank == 1:
        def out_of_memory(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (planted)")

        loss.micro_batch_prox_logp = out_of_memory
    seen["loss_error"] = _raised(lambda: a3po_update(actor, trajs, version=K + 3))
    return seen


def _nan_logits(module, args, out):
    out["logits"] = out["logits"] * math.nan
    return out


def _raised(fn) -> Raised | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the rank's result
        return Raised(type(exc).__name__, exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc))
    return None


@pytest.mark.integration
def test_two_fsdp_ranks_with_different_shards_decide_raise_and_log_as_one(tiny_model, tmp_path):
    out = tmp_path / "actor"
    seen = run_ranks(_two_actors, str(tiny_model), timeout=150, output=str(out))
    logs = [(tmp_path / f"actor.rank{r}").read_text() for r in (0, 1)]

    # 1. AReaL's export over the dp group went through and both ranks hold the same numbers: the
    #    audit's keys are the same on both ranks although their staleness sets differ.
    assert all(isinstance(s, dict) for s in seen), seen
    stats = seen[0]["stats"]
    assert stats == seen[1]["stats"]
    a = "ppo_actor/update/a3po/audit/"
    n = stats[a + "tokens"]
    assert n == sum(stats[f"{a}staleness_{d}/tokens"] for d in (0, 1, 2)) + stats[a + "staleness_gt_2/tokens"]
    assert stats[a + "staleness_0/tokens"] > 0 and stats[a + "staleness_gt_2/tokens"] > 0  # rank 0's d = 0, rank 1's d = 3
    assert stats[a + "staleness_0/abs_error/max"] == 0.0  # d = 0: π_prox = π_θ, the recomputed one
    #    The fallback (threshold 0) switched on both ranks at that step; warnings and the configuration line come from rank 0.
    assert seen[0]["mode"] == seen[1]["mode"] == "recompute"
    assert [w.split(":")[0] for w in seen[0]["warnings"]] == ["A-3PO", "A-3PO fallback at step 3"]
    assert "tokens with staleness 3 > 2" in seen[0]["warnings"][0]  # rank 1's tokens, warned about by rank 0
    assert seen[1]["warnings"] == []
    assert logs[0].count("A-3PO: π_prox approximated without a forward pass") == 1
    assert "A-3PO: π_prox approximated" not in logs[1] and "A-3PO fallback" not in logs[1]

    # 2. A bad shard on rank 1 only: the same named error on both ranks, raised before the update.
    assert seen[0]["nan_behaviour"] == seen[1]["nan_behaviour"]
    assert seen[0]["nan_behaviour"].type == "ValueError"
    assert "behaviour logprobs ('logprobs' from the inference engine) are NaN/Inf on 1 generated token" in seen[0]["nan_behaviour"].message
    assert seen[0]["float_versions"] == seen[1]["float_versions"] == Raised(
        "TypeError",
        "'versions' must be an integer tensor (weight version per token, -1 for prompt tokens), got dtype torch.float32 "
        "in the trajectory 1; convert it in the workflow with versions.long(). [rank 1 of 2; every rank stops]",
    )

    assert seen[0]["unforeseen"] == seen[1]["unforeseen"]
    assert seen[0]["unforeseen"].type == "RuntimeError" and seen[0]["unforeseen"].message.endswith("[rank 1 of 2; every rank stops]")
    assert "The size of tensor a" in seen[0]["unforeseen"].message

    # 3. Rank 1's shard masked entirely: both ranks stop, naming rank 1, before anything is trained.
    assert seen[0]["masked_shard"] == seen[1]["masked_shard"]
    assert seen[0]["masked_shard"].message.startswith("A-3PO: the shard of data-parallel rank(s) [1] of 2 has no token with loss_mask=1")
    assert seen[0]["masked_shard_unchanged"] and seen[1]["masked_shard_unchanged"]

    # 4. log π_θ NaN on rank 1's tokens only: both ranks raise the same error after the minibatch.
    assert seen[0]["nan_theta"] == seen[1]["nan_theta"]
    assert seen[0]["nan_theta"].type == "FloatingPointError"
    assert "in minibatch 0: the model has diverged" in seen[0]["nan_theta"].message

    # 5. The plugin's part of the loss failed on rank 1 only: the same error on both ranks, its own type.
    assert seen[0]["loss_error"] == seen[1]["loss_error"] == Raised(
        "OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB (planted) [rank 1 of 2; every rank stops]")
