"""The audit's per-token errors, its report and stats keys, and its cross-rank totals, against values by hand."""

import math
import multiprocessing
import socket

import pytest
import torch

from areal_a3po.audit import (
    AUDIT_METRICS,
    TOKEN_METRICS,
    AuditInputs,
    AuditTotals,
    audit_report,
    clip_active,
    log_audit_report,
    token_errors,
)

L = math.log


def test_token_errors_by_hand():
    # approx â = log .5, truth p = log .25, behave b = log .5, θ = log .35:
    #   abs_error   |â − p| = log 2                               = 0.693147
    #   behave w.   |e^(â−b) − e^(p−b)| = |1 − 0.5|               = 0.5
    #   ratio       |e^(θ−â) − e^(θ−p)| = |0.7 − 1.4|             = 0.7
    #   kl (k3)     ρ − 1 − log ρ, ρ = e^(â−p) = 2: 2 − 1 − log 2 = 0.306853
    #   clip (ε = .2): Â > 0: r_true = 1.4 > 1.2 clipped, r_approx = 0.7 not  -> 1
    #                  Â < 0: r_approx = 0.7 < 0.8 clipped, r_true = 1.4 not  -> 1
    #                  Â = 0: never clipped                                   -> 0
    approx = torch.full((3,), L(0.5))
    truth = torch.full((3,), L(0.25))
    behave = torch.full((3,), L(0.5))
    theta = torch.full((3,), L(0.35))
    adv = torch.tensor([1.0, -1.0, 0.0])
    e = token_errors(approx, truth, behave, theta, adv, eps_clip=0.2)
    torch.testing.assert_close(e["abs_error"], torch.full((3,), 0.693147), atol=1e-6, rtol=0)
    torch.testing.assert_close(e["behave_imp_weight_abs_error"], torch.full((3,), 0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(e["importance_weight_abs_error"], torch.full((3,), 0.7), atol=1e-6, rtol=0)
    torch.testing.assert_close(e["kl"], torch.full((3,), 0.306853), atol=1e-6, rtol=0)
    assert e["clip_disagreement"].tolist() == [1.0, 1.0, 0.0]
    assert set(e) | {"max_abs_error"} == set(AUDIT_METRICS)


def test_exact_approximation_has_zero_error():
    x = torch.tensor([-0.1, -2.0, -7.5])
    e = token_errors(x, x, x - 0.3, x + 0.2, torch.tensor([1.0, -1.0, 1.0]), eps_clip=0.2)
    for name, value in e.items():
        assert torch.equal(value, torch.zeros(3)), name


def test_clip_active_uses_eps_clip_higher_for_positive_advantages():
    # r = 1.4: clipped with ε_high = ε = 0.2 (1.4 > 1.2), not with ε_high = 0.5 (1.4 < 1.5);
    # r = 0.7 with Â < 0: clipped by the lower bound 1 − 0.2 = 0.8 either way.
    log_r = torch.tensor([L(1.4), L(0.7)])
    adv = torch.tensor([1.0, -1.0])
    assert clip_active(log_r, adv, 0.2).tolist() == [True, True]
    assert clip_active(log_r, adv, 0.2, eps_clip_higher=0.5).tolist() == [False, True]


def _audited_minibatch() -> AuditInputs:
    # Four tokens (the last one masked: garbage there must not count), minibatch j = 1, θ = truth p:
    #   p = [-1, -2, -3, -4], active â = [-1, -1.5, -3.5, ·], behaviour b = [-1.2, -1, -4, ·],
    #   staleness d = [0, 1, 1, ·]; compared methods: 'anchor_recompute' = p (exact), 'areal_loglinear' = b.
    p = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    b = torch.tensor([-1.2, -1.0, -4.0, 9.0])
    return AuditInputs(
        approx=torch.tensor([-1.0, -1.5, -3.5, 50.0]), others={"anchor_recompute": p.clone(), "areal_loglinear": b.clone()},
        truth=p, behave=b, theta=p.clone(), advantages=torch.tensor([1.0, -1.0, 1.0, 1.0]),
        tokens=torch.tensor([True, True, True, False]), staleness=torch.tensor([0.0, 1.0, 1.0, 2.0]), minibatch=1, eps_clip=0.2,
        staleness_limit=1,  # buckets staleness_0, staleness_1, staleness_gt_1
    )


def test_audit_report_by_hand():
    # |â − p| = [0, .5, .5] and |b − p| = [.2, 1, 1] on the tokens, 0 on the masked one.
    # Clip (θ = p, so the true ratio is 1, never clipped): r̂ = e^(p − â) = [1, e^-.5 = .607 (Â < 0: < .8, clipped),
    # e^.5 = 1.649 (Â > 0: > 1.2, clipped)] -> disagreement [0, 1, 1].
    report = audit_report(_audited_minibatch())
    assert report.minibatch == 1 and report.tokens.tolist() == [True, True, True, False]
    torch.testing.assert_close(report.active["abs_error"], torch.tensor([0.0, 0.5, 0.5, 0.0]), rtol=0, atol=1e-7)
    assert report.active["clip_disagreement"].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert set(report.active) == set(TOKEN_METRICS) and sorted(report.others) == ["anchor_recompute", "areal_loglinear"]
    assert all(v.abs().max() == 0 for v in report.others["anchor_recompute"].values())
    torch.testing.assert_close(report.others["areal_loglinear"]["abs_error"], torch.tensor([0.2, 1.0, 1.0, 0.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(report.behave_gap, torch.tensor([0.2, 1.0, 1.0, 0.0]), rtol=0, atol=1e-6)
    # Every bucket, the empty one too (the masked token's d = 2 is not a token).
    assert {name: sel.tolist() for name, sel in report.staleness.items()} == {
        "staleness_0": [True, False, False, False], "staleness_1": [False, True, True, False], "staleness_gt_1": [False] * 4,
    }


def test_log_audit_report_writes_exactly_these_keys():
    from areal.utils import stats_tracker

    stats_tracker.export_all()
    with stats_tracker.scope("a3po"):
        log_audit_report(audit_report(_audited_minibatch()))
    stats = stats_tracker.export_all()

    methods = ["", "anchor_recompute/", "areal_loglinear/"]
    averaged = [f"audit/{m}{metric}" for m in methods for metric in TOKEN_METRICS]
    averaged += [f"audit/{bucket}/{m}abs_error" for bucket in ("minibatch_1", "staleness_0", "staleness_1") for m in methods]
    averaged += ["audit/staleness_0/behave_gap", "audit/staleness_1/behave_gap"]
    # staleness_gt_1 holds no token: its averages are left out by AReaL's export, its token count is 0.
    plain = ["audit/tokens", "audit/max_abs_error", "audit/minibatch_1/tokens", "audit/staleness_0/tokens", "audit/staleness_1/tokens",
             "audit/staleness_gt_1/tokens"]
    assert set(stats) == {f"a3po/{k}/{agg}" for k in averaged for agg in ("avg", "max", "min")} | {f"a3po/{k}" for k in plain}

    # Means over the 3 tokens (see test_audit_report_by_hand): |â − p| (0 + .5 + .5)/3, |b − p| (.2 + 1 + 1)/3.
    expected = {
        "audit/tokens": 3.0, "audit/max_abs_error": 0.5, "audit/abs_error/avg": 1 / 3, "audit/clip_disagreement/avg": 2 / 3,
        "audit/anchor_recompute/abs_error/max": 0.0, "audit/areal_loglinear/abs_error/avg": 2.2 / 3,
        "audit/minibatch_1/tokens": 3.0, "audit/minibatch_1/abs_error/avg": 1 / 3,
        "audit/staleness_0/tokens": 1.0, "audit/staleness_0/abs_error/avg": 0.0, "audit/staleness_0/behave_gap/avg": 0.2,
        "audit/staleness_1/tokens": 2.0, "audit/staleness_1/abs_error/avg": 0.5, "audit/staleness_1/behave_gap/avg": 1.0,
        "audit/staleness_1/areal_loglinear/abs_error/avg": 1.0, "audit/staleness_gt_1/tokens": 0.0,
    }
    for key, value in expected.items():
        assert stats[f"a3po/{key}"] == pytest.approx(value, abs=1e-6), key


def test_totals_are_token_weighted_over_micro_batches_and_skip_masked_tokens():
    # micro-batch 1: abs errors [1, 3, (masked 100)]; micro-batch 2: [2] -> mean (1+3+2)/3 = 2, max 3
    t = AuditTotals()
    assert t.empty
    zeros = lambda n: {m: torch.zeros(n) for m in AUDIT_METRICS if m != "max_abs_error"}  # noqa: E731
    e1 = {**zeros(3), "abs_error": torch.tensor([1.0, 3.0, 100.0]), "kl": torch.tensor([0.5, 0.5, 9.0])}
    e2 = {**zeros(1), "abs_error": torch.tensor([2.0]), "kl": torch.tensor([2.0])}
    t.add(e1, torch.tensor([True, True, False]))
    t.add(e2, torch.tensor([True]))
    out = t.reduce()
    assert out["abs_error"] == pytest.approx(2.0, abs=1e-7)
    assert out["max_abs_error"] == 3.0
    assert out["kl"] == pytest.approx(1.0, abs=1e-7)  # (0.5 + 0.5 + 2) / 3
    assert out["clip_disagreement"] == 0.0


def test_totals_without_tokens_are_nan():
    assert all(math.isnan(v) for v in AuditTotals().reduce().values())
    t = AuditTotals()
    t.add({m: torch.ones(2) for m in AUDIT_METRICS}, torch.tensor([False, False]))
    assert math.isnan(t.reduce()["abs_error"]) and math.isnan(t.reduce()["max_abs_error"])


def _rank_main(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    t = AuditTotals()
    # rank 0: two tokens with error 1; rank 1: one token with error 4 -> mean 6/3 = 2, max 4 on both
    errs = {m: torch.zeros(2) for m in AUDIT_METRICS if m != "max_abs_error"}
    errs["abs_error"] = torch.tensor([1.0, 1.0]) if rank == 0 else torch.tensor([4.0, 50.0])
    t.add(errs, torch.tensor([True, True]) if rank == 0 else torch.tensor([True, False]))
    queue.put((rank, t.reduce()))
    dist.destroy_process_group()


def test_reduce_gives_every_rank_the_same_decision_values():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")  # a fresh process: no process group inherited from other tests
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    assert results[0]["abs_error"] == pytest.approx(2.0) and results[0]["max_abs_error"] == 4.0
