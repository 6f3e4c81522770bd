"""The end-to-end runner on CPU: dry runs of every shipped config, the stats parser, the synthetic model, the launcher."""

import json
from pathlib import Path

import pytest

from benchmarks import e2e_speedup
from benchmarks.harness.launch import _cpu_list, read_stats

CONFIGS = sorted(str(p) for p in Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def test_dry_run_of_every_shipped_config(tmp_path, capsys):
    out = e2e_speedup.main(["--configs", *CONFIGS, "--steps", "3", "--dry-run", "--synthetic", "tiny",
                            "--override", f"cluster.fileroot={tmp_path}"])
    text = capsys.readouterr().out
    assert len(out["runs"]) == len(CONFIGS)
    for run in out["runs"]:
        assert f"[{run['name']}]" in text
        assert run["command"][1:4] == ["-m", "benchmarks.harness.train", "--config"]
        assert "total_train_steps=3" in run["command"] and "++synthetic.model=tiny" in run["command"]
    # the recompute forward runs only for AReaL's recompute method
    for line in text.splitlines():
        if line.startswith("["):
            assert ("recompute_forward=True" in line) == ("method=recompute " in line), line
    assert "engine=areal_a3po.actor.A3POFSDPActor" in text
    assert "synthetic tiny: 2 layers, hidden 64, vocab 512" in text


def test_methods_expand_each_config(tmp_path, capsys):
    out = e2e_speedup.main(["--configs", CONFIGS[0], "--methods", "recompute", "a3po-recompute", "--steps", "2",
                            "--dry-run", "--override", f"cluster.fileroot={tmp_path}"])
    assert [r["method"] for r in out["runs"]] == ["recompute", "a3po-recompute"]
    assert "actor.a3po.anchor=recompute" in out["runs"][1]["command"]


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_stats_are_summarised_and_compared(tmp_path):
    # recompute: steps 10 s apart (medians over steps after the first), recompute_logp 2.5 s;
    # a3po: 8 s apart -> speedup 10/8 = 1.25, 20% less time per step.
    rec = [dict(global_step=i, wall_time=100.0 + 10 * i, **{"timeperf/recompute_logp": 2.5, "timeperf/train_step": 6.0,
                "ppo_actor/task_reward/avg": 0.1 * i}) for i in range(4)]
    a3po = [dict(global_step=i, wall_time=50.0 + 8 * i, **{"timeperf/train_step": 6.1, "ppo_actor/task_reward/avg": 0.1 * i,
                 "eval-rollout/reward/avg": 0.7}) for i in range(4)]
    _write(tmp_path / "r.jsonl", rec)
    _write(tmp_path / "a.jsonl", a3po)
    results = {
        "rec": dict(method="recompute", summary=e2e_speedup.summarize_run(read_stats(tmp_path / "r.jsonl"))),
        "a3po": dict(method="a3po-paper", summary=e2e_speedup.summarize_run(read_stats(tmp_path / "a.jsonl"))),
    }
    e2e_speedup.compare(results)
    rs, asum = results["rec"]["summary"], results["a3po"]["summary"]
    assert (rs["step_seconds"], rs["total_seconds"], rs["recompute_logp_seconds"]) == (10.0, 30.0, 2.5)
    assert asum["recompute_logp_seconds"] == 0.0 and asum["eval_reward"] == 0.7
    assert rs["task_reward"] == pytest.approx(0.3)
    assert results["a3po"]["speedup"] == pytest.approx(1.25) and results["a3po"]["time_saved"] == pytest.approx(0.2)
    # share of the recompute phase kept: (T_rec - T) / R_rec = (10 - 8) / 2.5 = 0.8
    assert results["a3po"]["kept"] == pytest.approx(0.8)
    for r, f in zip(results.values(), ("r.jsonl", "a.jsonl")):
        r["config_file"] = f
    agg = e2e_speedup.aggregate(results)
    # recompute phase 2.5 of a 10 s step = 25%; the limit for dropping it: 0.75 x the step
    assert agg["r:recompute"]["recompute_share"]["median"] == pytest.approx(0.25)
    assert agg["r:recompute"]["limit_ratio"]["median"] == pytest.approx(0.75)
    assert agg["a:a3po-paper"]["speedup"]["median"] == pytest.approx(1.25)
    assert agg["a:a3po-paper"]["first_reward"]["median"] == 0.0 and agg["a:a3po-paper"]["last_reward"]["median"] == pytest.approx(0.3)
    table = e2e_speedup.format_table(results, agg)
    assert "1.250" in table and "80%" in table and "25.0%" in table and "reported elsewhere (not measured here)" in table
    e2e_speedup.plot(results, str(tmp_path / "e2e.png"))
    assert (tmp_path / "e2e.png").read_bytes()[:4] == b"\x89PNG"


def test_synthetic_model_tokenizer_and_reward(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.harness.models import build_model, model_shape

    from benchmarks.harness.tasks import reward_fn, reversal_dataset

    path = build_model(tmp_path / "m", "tiny")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.num_hidden_layers == 2 and len(tok) == model.config.vocab_size == 512
    row = reversal_dataset(3, seed=1)[0]
    prompt = tok.apply_chat_template(row["messages"], tokenize=False)
    assert prompt == row["messages"][0]["content"] + " "
    assert tok.decode(tok(prompt)["input_ids"]).split() == prompt.split()
    assert reward_fn(prompt, row["answer"], [], [], row["answer"]) == 1.0
    # answer "4 1 3 2", position by position 1 - |g - a|/9 for a digit, 0 otherwise, mean of 4:
    # "4 1 5 2 <t9>" -> (1 + 1 + (1 - 2/9) + 1)/4 = 34/36 (the extra token is ignored)
    assert reward_fn(prompt, "4 1 5 2 <t9>", [], [], "4 1 3 2") == pytest.approx(34 / 36, abs=1e-12)
    # "4 <t9> 3" -> (1 + 0 + 1 + missing 0)/4 = 0.5; "13" is not a digit token -> 0
    assert reward_fn(prompt, "4 <t9> 3", [], [], "4 1 3 2") == 0.5
    assert reward_fn(prompt, "13 1 3 2", [], [], "4 1 3 2") == 0.75
    assert reward_fn(prompt, "", [], [], row["answer"]) == 0.0
    assert model_shape("qwen2.5-1.5b")["hidden_size"] == 1536
    with pytest.raises(ValueError, match=r"unknown model shape 'gpt5'; choose one of \['cpu-mid', 'cpu-tiny', 'cpu-wide', 'qwen2.5-1.5b', 'tiny', 'toy'\]"):
        model_shape("gpt5")


def test_trainer_mirrors_committed_stats_to_jsonl(tmp_path):
    from areal.api import FinetuneSpec
    from areal.utils.stats_logger import StatsLogger

    from areal_a3po.config import load_config
    from benchmarks.harness.train import JsonlStatsLogger, SyntheticGRPOConfig

    config, _ = load_config(["--config", CONFIGS[0], f"cluster.fileroot={tmp_path}"], SyntheticGRPOConfig)
    inner = StatsLogger(config, FinetuneSpec(total_train_epochs=1, dataset_size=4, train_batch_size=2))
    logger = JsonlStatsLogger(inner, str(tmp_path / "stats.jsonl"))
    logger.commit(0, 0, 0, {"timeperf/train_step": 1.5, "x__count": 3})
    logger.commit(0, 1, 1, {"timeperf/train_step": 1.25})
    rows = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [(r["global_step"], r["timeperf/train_step"]) for r in rows] == [(0, 1.5), (1, 1.25)]
    assert "x__count" not in rows[0] and rows[1]["wall_time"] >= rows[0]["wall_time"]
    logger.close()


def test_repetitions_alternate_the_order_and_core_lists_parse():
    plans = [["rec", "a3po"], ["rec", "a3po"], ["rec", "a3po"]]
    assert [(rep, r) for rep, r in e2e_speedup.order(plans)] == [
        (0, "rec"), (0, "a3po"), (1, "a3po"), (1, "rec"), (2, "rec"), (2, "a3po")]
    assert _cpu_list("0-2,5") == {0, 1, 2, 5} and _cpu_list("1") == {1}


def test_mismatch_summary_weights_by_tokens():
    from benchmarks import mismatch

    A = mismatch.AUDIT
    # d = 0: 10 tokens with gap 1e-3, then 30 with gap 3e-3 -> (10 x 1e-3 + 30 x 3e-3) / 40 = 2.5e-3;
    # the paper anchor's error at d = 1 only in the second step. Stats are AReaL's step averages (/avg).
    rows = [
        {A + "staleness_0/tokens": 10, A + "staleness_0/behave_gap/avg": 1e-3, A + "staleness_0/abs_error/avg": 0.0,
         A + "minibatch_0/tokens": 10, A + "minibatch_0/abs_error/avg": 0.0},
        {A + "staleness_0/tokens": 30, A + "staleness_0/behave_gap/avg": 3e-3, A + "staleness_0/abs_error/avg": 0.0,
         A + "staleness_1/tokens": 5, A + "staleness_1/anchor_paper/abs_error/avg": 0.2,
         A + "minibatch_0/tokens": 35, A + "minibatch_0/abs_error/avg": 0.01},
    ]
    s = mismatch.summarize(rows)
    assert s["by_staleness"][0]["behave_gap"] == pytest.approx(2.5e-3) and s["by_staleness"][0]["tokens"] == 40
    assert s["by_staleness"][1]["a3po paper"] == pytest.approx(0.2) and s["by_staleness"][1]["a3po recompute"] is None
    # minibatch 0: (10 x 0 + 35 x 0.01) / 45
    assert s["by_minibatch"][0]["a3po recompute"] == pytest.approx(0.35 / 45)
    assert "2.50e-03" in mismatch.format_tables({"x": s})


def test_read_stats_skips_a_line_being_written(tmp_path):
    # A watched run's last line may be half written (or cut by a kill): the rows before it count.
    path = tmp_path / "stats.jsonl"
    path.write_text('{"global_step": 0, "wall_time": 1.0}\n{"global_step": 1, "wall_time": 2.0}\n{"global_st')
    assert [r["global_step"] for r in read_stats(path)] == [0, 1]


_WRITER = """
import json, os, sys, time
path = sys.argv[1]
for step in range(100):
    with open(path, "a") as f:
        f.write(json.dumps({"global_step": step, "wall_time": time.time()}) + "\\n")
    time.sleep(0.05)
"""


def test_launch_kills_the_whole_run_after_the_step_and_reads_its_stats(tmp_path):
    import os
    import sys

    from benchmarks.harness.launch import Kill, launch

    stats = tmp_path / "stats.jsonl"
    # the watched process starts a child of its own (as AReaL's controller does): killpg must reach both
    child = tmp_path / "child.pid"
    command = [sys.executable, "-c", f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
               f"open({str(child)!r}, 'w').write(str(p.pid)); exec({_WRITER!r})", str(stats)]
    run = launch(command, log_file=tmp_path / "run.log", stats=tmp_path / "stats*.jsonl", kill=Kill.after_step(2),
                 timeout=60)
    assert run.killed and run.returncode == -9
    assert run.steps()[:3] == [0, 1, 2] and run.stats_file == stats
    assert run.output.startswith("$ " + sys.executable)
    pid = int(child.read_text())
    import time

    time.sleep(0.5)
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().split()[2] == "Z", "the run's child survived the kill"
    except ProcessLookupError:
        pass


# The run's controller starts a worker (a child whose command line says ``--role worker``) and writes a
# stats row every 50 ms; it ends by itself (exit 3) once the worker is gone, as AReaL's controller does
# when a worker dies; on SIGTERM it writes "controller: SIGTERM" and exits 143.
_CONTROLLER = """
import json, signal, subprocess, sys, time
def stopped(signum, frame):
    print("controller: SIGTERM", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, stopped)
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--role", "worker"])
open(sys.argv[2], "w").write(str(worker.pid))
for step in range(400):
    with open(sys.argv[1], "a") as f:
        f.write(json.dumps({"global_step": step, "wall_time": time.time()}) + "\\n")
    if worker.poll() is not None:
        print(f"controller: the worker ended ({worker.returncode})", flush=True)
        sys.exit(3)
    time.sleep(0.05)
"""


def _role_worker(proc, root_pid):
    return "--role" in proc.cmdline() and proc.pid != root_pid


def test_launch_signals_only_the_matching_processes_and_watches_the_run_end(tmp_path):
    import os
    import signal
    import sys

    from benchmarks.harness.launch import Kill, controller, launch

    stats, pid = tmp_path / "stats.jsonl", tmp_path / "worker.pid"
    command = [sys.executable, "-c", _CONTROLLER, str(stats), str(pid)]
    # SIGKILL the worker once step 2 is committed: the controller is not signalled, sees it gone, ends with 3
    run = launch(command, log_file=tmp_path / "worker.log", stats=stats, kill=Kill.after_step(2, _role_worker),
                 timeout=60)
    assert run.killed and run.returncode == 3 and run.output.splitlines()[-1] == "controller: the worker ended (-9)"
    assert 2 in run.steps() and 0 <= run.ended_after_kill < 30
    # kill_when and SIGTERM to the controller alone (what a scheduler sends): it ends by itself, and its worker
    # (which this controller does not stop) is left running: no group kill after a run that ended by itself
    stats.unlink()
    try:
        run = launch(command, log_file=tmp_path / "controller.log", stats=stats, timeout=60,
                     kill=Kill(lambda rows: len(rows) >= 3, controller, signal.SIGTERM))
        assert run.killed and run.returncode == 143 and run.output.splitlines()[-1] == "controller: SIGTERM"
        os.kill(int(pid.read_text()), 0)  # the worker is alive
    finally:
        os.kill(int(pid.read_text()), signal.SIGKILL)
    # nothing killed when the condition never holds
    stats.unlink()
    run = launch([sys.executable, "-c", "print('done')"], log_file=tmp_path / "ok.log", stats=stats,
                 kill=Kill.after_step(0, _role_worker))
    assert not run.killed and run.ended_after_kill is None and run.returncode == 0


def test_wait_until_polls_until_done_or_the_timeout():
    import time

    from benchmarks.harness.launch import wait_until

    calls = []
    assert wait_until(lambda: calls.append(1) or len(calls) == 3, timeout=None, interval=0.01) is True
    assert len(calls) == 3
    start = time.monotonic()
    assert wait_until(lambda: False, timeout=0.2, interval=0.05) is False
    assert 0.2 <= time.monotonic() - start < 2


def test_launch_times_out_and_leaves_nothing(tmp_path):
    import sys

    import pytest

    from benchmarks.harness.launch import launch

    # The error says where the run stood (phase, steps) and ends with the run's last output lines.
    with pytest.raises(TimeoutError, match=r"no result after 1 s \(starting AReaL's workers, 0 step\(s\) committed\); "
                                           r"output in .*run\.log; its last lines:\n    \$ .*\n    still here$"):
        launch([sys.executable, "-c", "import time; print('still here', flush=True); time.sleep(30)"], log_file=tmp_path / "run.log",
               stats=tmp_path / "none", timeout=1)
    run = launch([sys.executable, "-c", "print('done')"], log_file=tmp_path / "ok.log", stats=tmp_path / "none")
    assert run.returncode == 0 and run.rows == [] and run.stats_file is None and "done" in run.output


@pytest.mark.parametrize("server, config, point", [
    ("", "cpu_wide_pinned_sglang", "wide-sglang (4 layers, hidden 256, 24 new tokens, SGLang)"),  # the default
    ("SERVER=vllm", "cpu_wide_pinned", "wide (4 layers, hidden 256, 24 new tokens)"),
])
def test_make_demo_plans_its_two_runs(tmp_path, server, config, point):
    # The README's main command, as typed (only --dry-run added through ARGS): its configs, methods
    # and overrides load and validate, on SGLang by default. Skipped where `make install` has not run
    # (it would install).
    import subprocess

    repo = Path(__file__).parent.parent
    if subprocess.run(["make", "-q", "install"], cwd=repo).returncode != 0:
        pytest.skip("the venvs are not installed by `make install` here")
    out = subprocess.run(["make", "-s", "demo", *([server] if server else []),
                          f"ARGS=--dry-run --override cluster.fileroot={tmp_path}"], cwd=repo,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = [line for line in out.stdout.splitlines() if line.startswith(f"[{config}-")]
    assert [line.split()[1] for line in runs] == [f"method={m}" for m in ("recompute", "a3po-paper")]
    assert all("steps=16" in line for line in runs) and out.stdout.count("actor.a3po.audit_interval=10") == 1  # a3po only
    assert f"point {point}: 2 runs" in out.stdout


def test_make_demo_names_a_server_it_does_not_know(tmp_path):
    import subprocess

    out = subprocess.run(["make", "-s", "demo", "SERVER=vlm"], cwd=Path(__file__).parent.parent, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "make demo: SERVER=vlm: use SERVER=sglang (the default) or SERVER=vllm" in out.stderr


def _share_run(point, method, rep, step, recompute, rewards):
    summary = dict(steps=len(rewards), step_seconds=step, recompute_logp_seconds=recompute, train_step_seconds=step - recompute - 1.0, seq_len=20.0,
                   first_reward=rewards[0], audit_abs_error=None,
                   reward_curve=[(i, float(i), r) for i, r in enumerate(rewards)])
    return f"{point}-{method}-r{rep}", dict(point=point, method=method, repeat=rep, summary=summary)


def test_share_summary_by_hand(tmp_path, capsys):
    from benchmarks import share

    # Two repetitions at 'wide'. r0: recompute 10 s a step of which 2.5 s recompute (share .25),
    # a3po 8 s -> saved 1 − 8/10 = 20%, kept (10 − 8)/2.5 = 80%. r1: recompute 12 s / 3 s (share .25),
    # a3po 9 s -> saved 25%, kept 100%. Final reward = mean of the last FINAL = 10 steps.
    runs = dict([
        _share_run("wide", "recompute", 0, 10.0, 2.5, [0.1] * 5 + [0.5] * 10),
        _share_run("wide", "a3po-paper", 0, 8.0, 0.0, [0.1] * 5 + [0.4] * 10),
        _share_run("wide", "recompute", 1, 12.0, 3.0, [0.1] * 5 + [0.3] * 10),
        _share_run("wide", "a3po-paper", 1, 9.0, 0.0, [0.1] * 5 + [0.4] * 10),
    ])
    e2e_speedup.compare(runs)
    p = share.summarize(runs)["wide"]
    assert p.recompute_share == e2e_speedup.Spread(median=0.25, min=0.25, max=0.25, n=2)
    a3po = p.methods["a3po-paper"]
    assert a3po.time_saved.min == pytest.approx(0.20) and a3po.time_saved.max == pytest.approx(0.25)
    assert a3po.kept.min == pytest.approx(0.80) and a3po.kept.max == pytest.approx(1.00)
    assert a3po.time_saved.median == pytest.approx(0.225) and a3po.kept.median == pytest.approx(0.90)
    # final rewards: recompute .5 and .3, a3po .4 and .4 -> per seed −.1 and +.1; seed spread .5 − .3 = .2
    diff = a3po.final_reward_vs_recompute
    assert diff.min == pytest.approx(-0.1) and diff.max == pytest.approx(0.1)
    assert p.seed_spread == pytest.approx(0.2)
    # train_step: recompute 10 − 2.5 − 1 = 6.5 and 8; a3po 7 and 8 -> 7/6.5 − 1 = +7.7% and 0%
    assert a3po.train_step_vs_recompute.max == pytest.approx(7 / 6.5 - 1) and a3po.train_step_vs_recompute.min == 0.0
    # per token: every run's sequences are 20 tokens long here, so the same ratios
    assert a3po.train_step_per_token_vs_recompute.max == pytest.approx(7 / 6.5 - 1)
    table = share.format_table({"wide": p})
    assert "22.5% [20.0%, 25.0%]" in table and "90.0% [80.0%, 100.0%]" in table
    share.plot({"wide": p}, runs, str(tmp_path / "share.png"))
    assert (tmp_path / "share.png").read_bytes()[:4] == b"\x89PNG"
    # A shorter repetition (timing only) is paired for the time saved but left out of the learning figures.
    runs.update(dict([_share_run("wide", "recompute", 2, 10.0, 2.5, [0.0] * 5), _share_run("wide", "a3po-paper", 2, 8.0, 0.0, [0.9] * 5)]))
    e2e_speedup.compare(runs)
    p = share.summarize(runs)["wide"]
    assert p.methods["a3po-paper"].time_saved.n == 3 and p.methods["a3po-paper"].final_reward.n == 2
    # Runs merged from several points (``--from-json a.json b.json``) pair within their point: a 'tiny'
    # recompute run of repetition 0 (2 s a step) listed first changes nothing at 'wide'.
    merged = dict([_share_run("tiny", "recompute", 0, 2.0, 0.5, [0.0] * 15), *runs.items()])
    e2e_speedup.compare(merged)
    assert share.summarize(merged)["wide"].methods["a3po-paper"].time_saved == p.methods["a3po-paper"].time_saved
    # Tokens clipped: the mean over the steps that report AReaL's clip ratio, (0.1 + 0.3) / 2 = 0.2.
    assert share.clip_ratio({"rows": [{share.CLIP_KEY: 0.1}, {share.CLIP_KEY: 0.3}, {}]}) == pytest.approx(0.2)
    assert share.clip_ratio({"rows": []}) is None


def test_share_reads_the_version_tags_and_names_a_point_under_another_areal():
    from benchmarks import share

    # Per generation, retagged 2 and 0 -> mean 1.0; ambiguous 0 and 1 -> 0.5 (a step without the keys
    # is left out); suspect tokens 1 + 0 of 100 + 50 checked -> 1/150.
    rows = [{share.RETAGGED_KEY: 2.0, share.AMBIGUOUS_KEY: 0.0, share.CHECKED_KEY: 100.0, share.SUSPECT_KEY: 1.0},
            {share.RETAGGED_KEY: 0.0, share.AMBIGUOUS_KEY: 1.0, share.CHECKED_KEY: 50.0, share.SUSPECT_KEY: 0.0},
            {}]
    retagged, ambiguous, suspect = share.tag_figures({"rows": rows})
    assert (retagged, ambiguous) == (1.0, 0.5) and suspect == pytest.approx(1 / 150, rel=1e-12)
    assert share.tag_figures({"rows": [{}]}) == (None, None, None)  # a recompute run: no tag check, AReaL's engine
    # `--label areal-2.0.0` names the results wide@areal-2.0.0: the point is still 'wide' (its config, its model).
    assert share.point_of("wide@areal-2.0.0") is share.POINTS["wide"] and share.point_of("nope") is None
    runs = dict([_share_run("wide@areal-2.0.0", "recompute", 0, 10.0, 2.5, [0.1] * 15),
                 _share_run("wide@areal-2.0.0", "a3po-paper", 0, 8.0, 0.0, [0.1] * 15)])
    runs["wide@areal-2.0.0-a3po-paper-r0"]["rows"] = rows
    e2e_speedup.compare(runs)
    p = share.summarize(runs)["wide@areal-2.0.0"]
    assert p.config == "configs/cpu_wide_pinned.yaml" and p.methods["a3po-paper"].retagged.median == 1.0
    assert "Version tags" in share.format_table({p.point: p}) and "0.67%" in share.format_table({p.point: p})
