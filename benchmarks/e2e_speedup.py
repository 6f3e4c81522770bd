"""End-to-end speedup on AReaL's SGLang + GPU setup: the methods back to back, AReaL's own timings.

    python -m benchmarks.e2e_speedup --configs configs/setup1_*.yaml --steps 50 [--json out.json] [--plot out.png]
    python -m benchmarks.e2e_speedup --configs configs/gsm8k_a3po_2gpu.yaml \\
        --methods recompute a3po-paper a3po-recompute areal-loglinear --steps 50 --synthetic
    python -m benchmarks.e2e_speedup --configs configs/*.yaml --steps 50 --dry-run

Each run is ``python -m areal_a3po.train --config X total_train_steps=N ...`` launched exactly as an
AReaL user launches it (the config's ``scheduler.type``: local, ray or slurm). ``--methods`` runs
every config once per method (as Hydra overrides); without it each config runs as written. After
each run the runner reads the stats AReaL committed (``A3POTrainer`` mirrors them into
``<log dir>/stats.jsonl``): ``timeperf/recompute_logp``, ``timeperf/train_step``, the wall time
between steps, the task reward and, when the config evaluates, the eval reward. It prints and saves
time per step, total time, speedup against the recompute run, and final rewards.

``--synthetic [SHAPE]``: a random-initialised model of SHAPE (default qwen2.5-1.5b) and synthetic
digit-reversal prompts with a cheap verifiable reward (``areal_a3po.synthetic``), so the timing
comparison runs on any GPU box without weights or datasets. ``--dry-run``: loads and validates every
config, builds what can be built without a GPU (the plugin's engine class, the synthetic tokenizer,
prompts and reward) and prints the commands it would run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.output import save

METHODS = {
    "recompute": ["actor.prox_logp_method=recompute"],
    "a3po-paper": ["actor.prox_logp_method=a3po", "actor.a3po.anchor=paper"],
    "a3po-recompute": ["actor.prox_logp_method=a3po", "actor.a3po.anchor=recompute"],
    "areal-loglinear": ["actor.prox_logp_method=loglinear"],
}
#: The paper's and AReaL's reported figures, shown next to ours (A3PO_NOTES.md); never our numbers.
REPORTED = {
    "paper v1 abstract": "18% less training time",
    "authors' write-up, Setup 1": "1.82 h -> 1.53 h (-16%), eval 0.797 vs 0.791",
    "AReaL docs (prox_approx), 300 steps": "207 min -> 163 min (1.27x), eval 0.795 vs 0.799",
}


def method_of(config) -> str:
    actor = config.actor
    if actor.prox_logp_method == "a3po":
        return f"a3po-{actor.a3po.anchor}"
    return {"loglinear": "areal-loglinear"}.get(actor.prox_logp_method, actor.prox_logp_method)


def plan_runs(configs: list[str], methods: list[str] | None, steps: int, overrides: list[str], synthetic: str | None, tag: str) -> list[dict]:
    """One dict per run: label, method, config object, command line and environment."""
    from areal_a3po.config import load_config

    runs = []
    for path in configs:
        for method in methods or [None]:
            extra = list(METHODS[method]) if method else []
            base = [f"total_train_steps={steps}", *overrides, *extra]
            if synthetic:
                base.append(f"++synthetic.model={synthetic}")  # ++: also for YAMLs without the block
            probe, _ = load_config(["--config", path, *base])  # validated here, before anything runs
            name = f"{Path(path).stem}-{method or method_of(probe)}"
            args = ["--config", path, *base, f"trial_name=e2e-{tag}-{name}"]
            config, _ = load_config(args)
            env = {}
            runs.append(dict(name=name, method=method or method_of(config), config=config, config_file=path,
                             command=[sys.executable, "-m", "areal_a3po.train", *args], env=env))
    return runs


def log_dir(config) -> str:
    from areal.utils.stats_logger import StatsLogger

    return StatsLogger.get_log_path(config.stats_logger)


def read_stats(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _first(row: dict, *patterns: str):
    for p in patterns:
        for k, v in row.items():
            if p in k:
                return v
    return None


def summarize_run(rows: list[dict], skip: int = 1) -> dict:
    """Time per step and rewards from one run's committed stats (the first ``skip`` steps are warm-up)."""
    walls = [b["wall_time"] - a["wall_time"] for a, b in zip(rows, rows[1:])]
    body = rows[skip:] if len(rows) > skip else rows
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    recompute = [r.get("timeperf/recompute_logp", 0.0) for r in body]
    train = [r["timeperf/train_step"] for r in body if "timeperf/train_step" in r]
    last = rows[-1] if rows else {}
    evals = [v for v in (_first(r, "eval-rollout/reward", "eval-rollout/task_reward") for r in rows) if v is not None]
    return dict(
        steps=len(rows),
        step_seconds=med(walls[skip - 1 :] if skip else walls) if walls else None,
        total_seconds=(rows[-1]["wall_time"] - rows[0]["wall_time"]) if len(rows) > 1 else None,
        recompute_logp_seconds=med(recompute),
        train_step_seconds=med(train),
        task_reward=_first(last, "ppo_actor/task_reward/avg", "rollout/reward", "task_reward"),
        eval_reward=evals[-1] if evals else None,
    )


def compare(results: dict[str, dict]) -> dict:
    """Speedup of each run against the recompute run of the same config (or the first recompute run)."""
    base = next((r for r in results.values() if r["method"] == "recompute" and r["summary"].get("step_seconds")), None)
    for r in results.values():
        s = r["summary"]
        ok = base is not None and s.get("step_seconds")
        r["speedup"] = base["summary"]["step_seconds"] / s["step_seconds"] if ok else None
        r["time_saved"] = 1 - s["step_seconds"] / base["summary"]["step_seconds"] if ok else None
    return results


def format_table(results: dict[str, dict]) -> str:
    f = lambda x, spec: format(x, spec) if x is not None else "-"  # noqa: E731
    lines = [f"{'run':<34}{'method':<17}{'s/step':>9}{'recompute':>11}{'train':>9}{'total s':>10}{'speedup':>9}{'saved':>8}{'task r':>8}{'eval r':>8}"]
    for name, r in results.items():
        s = r["summary"]
        lines.append(
            f"{name:<34}{r['method']:<17}{f(s['step_seconds'], '.2f'):>9}{f(s['recompute_logp_seconds'], '.2f'):>11}"
            f"{f(s['train_step_seconds'], '.2f'):>9}{f(s['total_seconds'], '.0f'):>10}{f(r['speedup'], '.2f'):>9}"
            f"{f(r['time_saved'], '.0%'):>8}{f(s['task_reward'], '.3f'):>8}{f(s['eval_reward'], '.3f'):>8}"
        )
    lines.append("reported elsewhere (not measured here): " + "; ".join(f"{k}: {v}" for k, v in REPORTED.items()))
    return "\n".join(lines)


def plot(results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names)), 3.4))
    recompute = [results[n]["summary"]["recompute_logp_seconds"] or 0.0 for n in names]
    rest = [max((results[n]["summary"]["step_seconds"] or 0.0) - c, 0.0) for n, c in zip(names, recompute)]
    ax.bar(names, rest, label="rest of the step")
    ax.bar(names, recompute, bottom=rest, label="recompute_logp")
    ax.set_ylabel("median s per step")
    ax.tick_params(axis="x", labelrotation=20, labelsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dry_run(runs: list[dict], synthetic: str | None) -> None:
    """Build what needs no GPU and print what would run."""
    from areal_a3po.trainer import actor_engine_class

    for run in runs:
        c = run["config"]
        backend = c.actor.backend.split(":")[0]
        engine = actor_engine_class(backend) if c.actor.prox_logp_method == "a3po" else None
        print(f"[{run['name']}] method={run['method']} actor={c.actor.backend} rollout={c.rollout.backend} "
              f"gpus={c.cluster.n_nodes}x{c.cluster.n_gpus_per_node} scheduler={c.scheduler.type} "
              f"batch={c.train_dataset.batch_size}x{c.gconfig.n_samples} steps={c.total_train_steps} "
              f"recompute_forward={c.actor.should_compute_prox_logp()}"
              + (f" engine={engine.__module__}.{engine.__name__}" if engine else ""))
        env = " ".join(f"{k}={v}" for k, v in run["env"].items())
        print(f"  would run: {env + ' ' if env else ''}{' '.join(run['command'])}")
        print(f"  stats from: {os.path.join(log_dir(c), 'stats.jsonl')}")
    if synthetic:
        from areal_a3po.synthetic import build_synthetic_model, model_shape, reward_fn, synthetic_dataset
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as d:
            build_synthetic_model(d, synthetic, weights=False)
            tok = AutoTokenizer.from_pretrained(d)
            row = synthetic_dataset(1)[0]
            text = tok.apply_chat_template(row["messages"], tokenize=False)
            ids = tok(text)["input_ids"]
            assert reward_fn(text, row["answer"], ids, [], row["answer"]) == 1.0
            shape = model_shape(synthetic)
            print(f"synthetic {synthetic}: {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
                  f"vocab {len(tok)}; prompt {text!r} -> {ids}, answer {row['answer']!r}; weights written at run time")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", required=True, help="experiment YAMLs, run in this order")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="run each config once per method")
    parser.add_argument("--steps", type=int, default=50, help="total_train_steps of each run")
    parser.add_argument("--synthetic", nargs="?", const="qwen2.5-1.5b", default=None, metavar="SHAPE",
                        help="random model of SHAPE (qwen2.5-1.5b, tiny) and synthetic prompts")
    parser.add_argument("--dry-run", action="store_true", help="build and print, run nothing")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--json", help="write all figures to this file")
    parser.add_argument("--plot", help="draw time per step (recompute_logp vs the rest) to this PNG")
    args = parser.parse_args(argv)

    tag = time.strftime("%Y%m%d-%H%M%S")
    runs = plan_runs(args.configs, args.methods, args.steps, args.override, args.synthetic, tag)
    if args.dry_run:
        dry_run(runs, args.synthetic)
        return {"runs": [{k: v for k, v in r.items() if k != "config"} for r in runs]}

    results = {}
    for run in runs:
        print(f"=== {run['name']}: {' '.join(run['command'])}", flush=True)
        proc = subprocess.run(run["command"], env={**os.environ, **run["env"]})
        stats_path = os.path.join(log_dir(run["config"]), "stats.jsonl")
        if proc.returncode != 0 or not os.path.exists(stats_path):
            raise SystemExit(f"run {run['name']} failed (exit {proc.returncode}); see AReaL's log in {log_dir(run['config'])}")
        results[run["name"]] = dict(method=run["method"], config_file=run["config_file"], command=run["command"],
                                    summary=summarize_run(read_stats(stats_path)))
    compare(results)
    print(format_table(results))
    out = dict(steps=args.steps, synthetic=args.synthetic, results=results, reported=REPORTED)
    save(out, args.json, lambda path: plot(results, path), args.plot)
    return out


if __name__ == "__main__":
    main()
