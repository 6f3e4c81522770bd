"""The runners end to end on tiny settings: what each one measures must hold, not only its output's shape.

No timing is compared (CPU timings are noise at this size); what is checked is what a defect would
break: which variants run a recompute forward, that every variant trains (a nonzero gradient), that
the recompute anchor is exact with one minibatch, that the summaries are what the per-step rows say,
and that recompute *and* A-3PO learn the toy task (``benchmarks.learning --quick``).
"""

import json
import statistics

import pytest

from benchmarks.harness import variants as registry

pytestmark = pytest.mark.integration


def test_step_time_a3po_skips_the_recompute_forward_and_the_summary_follows_the_rows(tmp_path, capsys):
    from benchmarks import step_time

    out, png = tmp_path / "st.json", tmp_path / "st.png"
    step_time.main(["--steps", "3", "--seqs", "2", "--seq-len", "12", "--json", str(out), "--plot", str(png)])
    data = json.loads(out.read_text())
    rows = data["per_step"]
    assert list(rows) == list(registry.COMPARED) and all(len(r) == 3 for r in rows.values())
    # recompute runs AReaL's forward once per step, in its own timed phase; no other variant runs one
    assert [r["recompute_forwards"] for r in rows["recompute"]] == [1, 1, 1]
    assert all(r["recompute_logp"] > 0 for r in rows["recompute"])
    for name in ("areal-loglinear", "a3po-paper", "a3po-recompute"):
        assert [r["recompute_forwards"] for r in rows[name]] == [0, 0, 0], name
        assert not any("recompute_logp" in r for r in rows[name]), name
    # every variant trains: a loss without gradient (e.g. a zeroed A-3PO loss) shows as grad_norm 0
    for name, steps in rows.items():
        assert any(r["grad_norm"] > 0 for r in steps), name
    # the summary is the rows after the first step: the limit and each variant's per-step ratio
    summary, base = data["summary"], rows["recompute"][1:]
    limit = statistics.median((b["total"] - b["recompute_logp"]) / b["total"] for b in base)
    assert summary["limit_ratio"]["median"] == pytest.approx(limit) and 0 < limit < 1
    for name, steps in rows.items():
        ratio = statistics.median(r["total"] / b["total"] for r, b in zip(steps[1:], base))
        assert summary["ratio_vs_recompute"][name]["median"] == pytest.approx(ratio), name
        assert summary["phases"][name]["total"]["median"] == pytest.approx(statistics.median(r["total"] for r in steps[1:]))
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "limit ratio" in capsys.readouterr().out


def test_step_time_gpu_mode_plan_and_its_cpu_path(tmp_path, capsys):
    import torch

    from benchmarks import step_time

    step_time.main(["--device", "cuda", "--model", "qwen2.5-1.5b-shape", "--dry-run"])
    assert "qwen2.5-1.5b: 28 layers, hidden 1536, vocab 151936, 1.54B parameters" in capsys.readouterr().out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r"--device cuda: no CUDA device is visible here"):
            step_time.main(["--device", "cuda", "--steps", "1"])
    # the shared-actor path of the GPU mode, on CPU with the tiny shape: the variant switched per step
    out = tmp_path / "shared.json"
    step_time.main(["--model", "tiny-shape", "--steps", "2", "--seqs", "2", "--seq-len", "12", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["settings"]["shared_actor"] and data["settings"]["model"] == "tiny"
    rows = data["per_step"]
    assert list(rows) == list(registry.COMPARED) and all(len(r) == 2 for r in rows.values())
    # one actor, so only the switch tells the variants apart: recompute's forward runs for it alone
    assert [r["recompute_forwards"] for r in rows["recompute"]] == [1, 1]
    for name in ("areal-loglinear", "a3po-paper", "a3po-recompute"):
        assert [r["recompute_forwards"] for r in rows[name]] == [0, 0], name
    assert data["summary"]["phases"]["recompute"]["recompute_logp"]["median"] > 0
    assert data["summary"]["phases"]["a3po-paper"]["recompute_logp"]["median"] == 0


def test_demo_with_the_plugins_own_audit(tmp_path, capsys):
    from benchmarks import in_process as demo

    out = tmp_path / "demo.json"
    demo.main(["--steps", "3", "--seqs", "4", "--seq-len", "12", "--minibatches", "1", "--audit-interval", "2",
               "--json", str(out)])
    data = json.loads(out.read_text())
    rows, summary = data["per_step"], data["summary"]
    assert [r["recompute_forwards"] for r in rows["recompute"]] == [1, 1, 1]
    for name in ("a3po-paper", "a3po-recompute"):
        # versions 0 and 2 are audited (version % 2 == 0): the audit's forward runs inside the update,
        # on those steps only; step 0 is dropped from the summary
        assert [r["audited"] for r in rows[name]] == [1.0, 0.0, 1.0]
        assert [r["recompute_forwards"] for r in rows[name]] == [1, 0, 1]
        assert not any("recompute_logp" in r for r in rows[name])
        assert summary[name]["audited_steps"] == 1 and summary[name]["recompute_forwards"] == 2
        assert any(r["grad_norm"] > 0 for r in rows[name]), name
    # one minibatch: the recompute anchor is π at version k exactly, on every token; the paper's is not
    assert [rows["a3po-recompute"][s]["abs_error_max"] for s in (0, 2)] == [0.0, 0.0]
    assert rows["a3po-paper"][2]["abs_error"] > 1e-3
    printed = capsys.readouterr().out
    assert "Audit (actor.a3po.audit_interval=2)" in printed
    assert "a3po-paper: recompute forward on 2 of 3 steps (the audit)" in printed


def test_accuracy_writes_tables_json_and_plot(tmp_path, capsys):
    from benchmarks import accuracy

    out, png = tmp_path / "acc.json", tmp_path / "acc.png"
    accuracy.main(["--max-staleness", "1", "--minibatches", "1", "2", "--seqs", "2", "--prompt-len", "3",
                   "--new-tokens", "3", "--json", str(out), "--plot", str(png)])
    data = json.loads(out.read_text())
    rows = accuracy.APPROXIMATIONS
    # 2 values of n x 2 staleness values x (5 approximations + the oracle)
    assert len(data["cells"]) == 2 * 2 * (len(rows) + 1)
    assert {c["method"] for c in data["cells"]} == {*rows, accuracy.ORACLE}
    assert all(len(c["by_minibatch"]) == c["minibatches"] for c in data["cells"])
    # The oracle (one α per bucket, fitted to the truth) is the best loglinear interpolation with one α
    # per bucket, so no method of that form does better: both a3po anchors with loglinear, in every
    # bucket, per n and overall. The linear form and AReaL's loglinear (α = 1 on each response's first
    # token) are other families (the default run has recompute/linear at 0.84x the oracle's error at
    # n=4, d=1, j=2): for them, only that the ratios are there.
    bounded = [m for m, (interpolation, _) in rows.items() if m.startswith("a3po") and interpolation == "loglinear"]
    assert len(bounded) == 2
    for c in data["cells"]:
        if c["method"] in bounded:
            assert min(c["over_oracle"], *c["over_oracle_by_minibatch"]) >= 1 - 1e-6, c
        elif c["method"] != accuracy.ORACLE:
            assert len(c["over_oracle_by_minibatch"]) == c["minibatches"] and c["over_oracle"] > 0
    for n, per_method in data["summary"]["by_minibatches"].items():
        assert set(per_method) == {*rows, accuracy.ORACLE}
        assert all(per_method[m]["over_oracle"] >= 1 - 1e-6 for m in bounded)
        alphas = per_method[accuracy.ORACLE]["alpha_by_staleness"]
        assert set(alphas) == {"oracle", "anchor recompute", "anchor paper"}
        assert all(len(by_d) == 2 and all(len(a) == int(n) for a in by_d) for by_d in alphas.values())
        assert alphas["anchor recompute"][1] == pytest.approx([j / int(n) / (1 + j / int(n)) for j in range(int(n))])  # (j/n)/(d + j/n)
    assert all(data["summary"]["overall"]["over_oracle"][m] >= 1 - 1e-6 for m in bounded)
    one = data["summary"]["by_minibatches"]["1"]
    # the recompute anchor is exact with one minibatch (every token: 0.0, not merely small); the
    # paper anchor is not at d = 1
    for interpolation in ("loglinear", "linear"):
        assert one[f"a3po recompute/{interpolation}"]["max_abs_error"] == 0.0
    assert one["a3po paper/loglinear"]["max_abs_error"] > 1e-4
    assert data["summary"]["targets"]["recompute_anchor_max_error_1_minibatch"] == 0.0
    assert png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "ppo_n_minibatches=2" in printed
    assert "\noracle " in printed and "error ÷ oracle error" in printed and "j=1 anchor recompute" in printed


def test_learning_quick_check_requires_every_quick_method_to_learn(capsys):
    from benchmarks import learning

    summary = {"recompute": dict(initial_reward=0.1, last3_reward=0.5), "a3po-paper": dict(initial_reward=0.1, last3_reward=0.15)}
    assert learning.quick_check({"summary": summary}) is False  # a3po-paper rose by 0.05 only
    assert "a3po-paper eval reward 0.100 -> 0.150 (last 3 evals): DOES NOT RISE" in capsys.readouterr().out
    summary["a3po-paper"]["last3_reward"] = 0.25
    assert learning.quick_check({"summary": summary}) is True
    assert set(learning.QUICK_METHODS) == {"recompute", "a3po-paper"}


def test_learning_quick_check_recompute_and_a3po_learn(tmp_path, capsys):
    from benchmarks import learning

    out, png = tmp_path / "learn.json", tmp_path / "learn.png"
    result = learning.main(["--quick", "--json", str(out), "--plot", str(png)])  # exits 1 unless both rise
    data = json.loads(out.read_text())
    assert set(data["curves"]) == {"recompute", "a3po-paper"}
    (rec,), (a3po,) = data["curves"]["recompute"], data["curves"]["a3po-paper"]
    assert [p["step"] for p in rec] == [p["step"] for p in a3po] == list(range(21))
    # the methods share the seed: same initial policy, same staleness draws at every step
    assert rec[0]["eval_reward"] == a3po[0]["eval_reward"]
    assert [p["staleness"] for p in rec[1:]] == [p["staleness"] for p in a3po[1:]]
    assert all(0 <= p["staleness"] <= 4 for p in rec[1:]) and any(p["staleness"] > 0 for p in rec[1:])
    for name in learning.QUICK_METHODS:
        s = result["summary"][name]
        assert s["last3_reward"] > s["initial_reward"] + learning.QUICK_MARGIN, name
        assert 0 < s["step_time"] <= s["trainer_time"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "quick check: recompute eval reward" in printed and "quick check: a3po-paper eval reward" in printed


def test_gpu_phases_runs_its_cuda_path_on_cpu(tmp_path):
    # The same code as on a GPU (device "cpu": no CUDA synchronisation), on the tiny CPU shape.
    from benchmarks import gpu_phases

    res = gpu_phases.main(["--device", "cpu", "--shape", "cpu-tiny", "--seqs", "2", "--seq-len", "16", "--repeats", "2",
                           "--json", str(tmp_path / "g.json")])
    assert set(res["median_seconds"]) == {"recompute", "train", "a3po paper", "a3po recompute"}
    r, t = res["median_seconds"]["recompute"], res["median_seconds"]["train"]
    assert res["recompute_share"] == pytest.approx(r / (r + t))
    assert json.loads((tmp_path / "g.json").read_text())["seqs"] == 2


def test_contention_times_the_trainer_with_the_other_core_idle_and_decoding(tmp_path, capsys):
    import multiprocessing
    import os

    from benchmarks import contention

    before = os.sched_getaffinity(0)
    out = contention.main(["--shapes", "toy", "--rounds", "2", "--steps", "2", "--seqs", "4", "--seq-len", "8",
                           "--json", str(tmp_path / "c.json")])
    (result,) = out
    assert result["steps_each"] == 4 and result["shape"] == "toy"  # 2 rounds x 2 steps in each state
    assert result["ratio"] == pytest.approx(result["loaded_seconds"] / result["idle_seconds"])
    assert result["idle_range"][0] <= result["idle_seconds"] <= result["idle_range"][1]
    assert json.loads((tmp_path / "c.json").read_text()) == out
    assert "loaded / idle" in capsys.readouterr().out
    # the decoding process is gone and this process's cores are what they were
    assert not multiprocessing.active_children() and os.sched_getaffinity(0) == before


def test_contention_needs_both_cores(capsys):
    import os

    from benchmarks import contention

    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    try:
        with pytest.raises(SystemExit):
            contention.main(["--shapes", "toy"])
    finally:
        os.sched_setaffinity(0, before)
    assert "needs cores 0 and 1; this process may use [0]" in capsys.readouterr().err
