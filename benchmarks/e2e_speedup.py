"""End-to-end speedup through AReaL's real loop: the methods run alternately, AReaL's own timings.

    python -m benchmarks.e2e_speedup --configs configs/cpu_tiny_pinned.yaml --pin \\
        --methods recompute a3po-paper a3po-recompute --steps 24 --repeats 3 --json e2e.json --plot e2e.png
    python -m benchmarks.e2e_speedup --configs configs/setup1_*.yaml --steps 50 [--json out.json] [--plot out.png]
    python -m benchmarks.e2e_speedup --configs configs/gsm8k_a3po_2gpu.yaml \\
        --methods recompute a3po-paper a3po-recompute areal-loglinear --steps 50 --synthetic
    python -m benchmarks.e2e_speedup --configs configs/*.yaml --steps 50 --dry-run

Each run is ``python -m benchmarks.harness.train --config X total_train_steps=N ...`` (the plugin's
entry point ``areal_a3po.train`` with the harness's stand-ins) launched the way an AReaL user
launches an experiment (the config's ``scheduler.type``), its output in a log file whose path is
printed, a progress bar fed by the stats AReaL commits (mirrored into ``<log dir>/stats.jsonl``). ``--methods`` runs every config once per method (Hydra overrides);
``--repeats R`` runs the whole list R times, the order reversed every other repetition, so that
drift of the machine hits every method alike. ``--pin`` launches the controller on core 0 with one
thread (for ``configs/cpu_tiny_pinned.yaml``, which puts the server on core 0 and the trainer on
core 1) and checks, during each run, on which cores every thread of the run may run.

Per run, after the first step (warm-up) and leaving out audited steps (they add a recompute forward):
the median wall-clock seconds per step, the median of each of AReaL's ``timeperf/*`` phases, the
total, the reward at the start and the end, the audited π_prox error when there is one. Per method,
the median and range over repetitions; per (method, repetition) pair with the recompute run of the
same repetition: the speedup ``T_rec / T`` and the share of the recompute phase that is kept,
``(T_rec − T) / R_rec`` (1 = everything the recompute forward cost is saved; the limit is
``T_rec − R_rec``); medians and ranges over pairs.

``--synthetic [SHAPE]``: a random-initialised model of SHAPE (default qwen2.5-1.5b) and synthetic
digit-reversal prompts with a cheap verifiable reward (``benchmarks.harness.tasks``), so the timing
comparison runs on any GPU box without weights or datasets. ``--dry-run``: loads and validates every
config, builds what can be built without a GPU (the plugin's engine class, the synthetic tokenizer,
prompts and reward) and prints the commands it would run.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from benchmarks.harness.launch import launch, without_spmd_env
from benchmarks.harness.variants import COMPARED, VARIANTS
from benchmarks.harness.train import STATS_FILE
from benchmarks import output
from benchmarks.output import figure, table

#: ``--methods``: the compared variants of the one registry, each as its Hydra overrides.
METHODS = {name: VARIANTS[name].overrides() for name in COMPARED}
#: AReaL's phases shown per method, in the order of a step.
REPORTED_PHASES = ("rollout", "compute_advantage", "recompute_logp", "train_step", "update_weights")
#: Figures reported by the paper's authors and by AReaL's docs, printed next to ours (not measured here).
REPORTED = {
    "paper v1 abstract": "18% less training time",
    "authors' write-up, Setup 1": "1.82 h -> 1.53 h (-16%), eval 0.797 vs 0.791",
    "AReaL docs (prox_approx), 300 steps": "207 min -> 163 min (1.27x), eval 0.795 vs 0.799",
}


def method_of(config) -> str:
    """The registry's name of the variant a loaded config runs."""
    actor = config.actor
    anchor = actor.a3po.anchor if actor.prox_logp_method == "a3po" else None
    return next((v.name for v in VARIANTS.values() if (v.prox_logp_method, v.anchor) == (actor.prox_logp_method, anchor)
                 and not v.on_policy), actor.prox_logp_method)


def plan_runs(configs: list[str], methods: list[str] | None, steps: int, overrides: list[str], synthetic: str | None, tag: str,
              seed: int | None = None) -> list[dict]:
    """One dict per run: label, method, config object, command line and environment (``seed``: the
    experiment's ``seed``, else the YAML's)."""
    from areal_a3po.config import load_config
    from benchmarks.harness.train import SyntheticGRPOConfig

    runs = []
    for path in configs:
        for method in methods or [None]:
            extra = list(METHODS[method]) if method else []
            base = [f"total_train_steps={steps}", *overrides, *extra, *([f"seed={seed}"] if seed is not None else [])]
            if synthetic:
                base.append(f"++synthetic.model={synthetic}")  # ++: also for YAMLs without the block
            probe, _ = load_config(["--config", path, *base], SyntheticGRPOConfig)  # validated here, before anything runs
            name = f"{Path(path).stem}-{method or method_of(probe)}"
            args = ["--config", path, *base, f"trial_name=e2e-{tag}-{name}"]
            config, _ = load_config(args, SyntheticGRPOConfig)
            env = {}
            runs.append(dict(name=name, method=method or method_of(config), config=config, config_file=path,
                             command=[sys.executable, "-m", "benchmarks.harness.train", *args], env=env))
    return runs


def log_dir(config) -> str:
    from areal.utils.stats_logger import StatsLogger

    return StatsLogger.get_log_path(config.stats_logger)


def _first(row: dict, *patterns: str):
    for p in patterns:
        for k, v in row.items():
            if p in k:
                return v
    return None


AUDIT_KEY = "ppo_actor/update/a3po/audit/abs_error/avg"
SEQ_LEN_KEY = "ppo_actor/seq_len/avg"  # prompt + generated tokens per sequence
REWARD_KEYS = ("ppo_actor/task_reward/avg", "rollout/reward", "task_reward")


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize_run(rows: list[dict], skip: int = 1) -> dict:
    """Time per step, AReaL's phases and rewards from one run's committed stats.

    Step i lasts ``wall_time[i] − wall_time[i−1]``; the first ``skip`` steps (warm-up) and audited
    steps (their recompute forward is not the method's cost) are left out of the medians.
    """
    walls = {b["global_step"]: b["wall_time"] - a["wall_time"] for a, b in zip(rows, rows[1:])}
    body = [r for r in rows[skip:] if AUDIT_KEY not in r] or rows[skip:] or rows
    steps = [walls[r["global_step"]] for r in body if r["global_step"] in walls]
    phases = sorted({k for r in body for k in r if k.startswith("timeperf/")})
    last = rows[-1] if rows else {}
    evals = [v for v in (_first(r, "eval-rollout/reward", "eval-rollout/task_reward") for r in rows) if v is not None]
    audits = [r[AUDIT_KEY] for r in rows if AUDIT_KEY in r]
    rewards = [_first(r, *REWARD_KEYS) for r in rows]
    return dict(
        steps=len(rows),
        step_seconds=_median(steps),
        total_seconds=(rows[-1]["wall_time"] - rows[0]["wall_time"]) if len(rows) > 1 else None,
        phases={k.removeprefix("timeperf/"): _median([r.get(k, 0.0) for r in body]) for k in phases},
        recompute_logp_seconds=_median([r.get("timeperf/recompute_logp", 0.0) for r in body]),
        train_step_seconds=_median([r["timeperf/train_step"] for r in body if "timeperf/train_step" in r]),
        seq_len=_median([r[SEQ_LEN_KEY] for r in body if SEQ_LEN_KEY in r]),
        task_reward=_first(last, *REWARD_KEYS),
        first_reward=rewards[0] if rewards else None,
        eval_reward=evals[-1] if evals else None,
        audit_abs_error=_median(audits),
        reward_curve=[(r["global_step"], r["wall_time"] - rows[0]["wall_time"], w) for r, w in zip(rows, rewards)],
    )


def against(summary: dict, base: dict | None) -> dict:
    """One run's figures against a recompute run's (both ``summarize_run`` summaries): the speedup
    ``T_rec / T``, the time saved ``1 − T / T_rec`` and the share of the recompute phase it keeps,
    ``(T_rec − T) / R_rec``; None where a time is missing."""
    base = base or {}
    t, t_rec, r_rec = summary.get("step_seconds"), base.get("step_seconds"), base.get("recompute_logp_seconds")
    ok = bool(t and t_rec)
    return dict(speedup=t_rec / t if ok else None, time_saved=1 - t / t_rec if ok else None,
                kept=(t_rec - t) / r_rec if ok and r_rec else None)


def compare(results: dict[str, dict]) -> dict:
    """Speedup of each run against the recompute run of its repetition (or the first recompute run),
    and the share of that run's recompute phase it keeps: ``(T_rec − T) / R_rec``."""
    recomputes = [r for r in results.values() if r["method"] == "recompute" and r["summary"].get("step_seconds")]
    for r in results.values():
        base = next((b for b in recomputes if b.get("repeat") == r.get("repeat")), recomputes[0] if recomputes else None)
        r.update(against(r["summary"], base["summary"] if base else None))
    return results


@dataclass(frozen=True)
class Spread:
    """The median and range of some figures over runs or pairs (the ``None`` among them left out)."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, xs: Iterable[float | None]) -> Spread | None:
        """None when no figure is there."""
        xs = [x for x in xs if x is not None]
        return cls(statistics.median(xs), min(xs), max(xs), len(xs)) if xs else None

    def format(self, spec: str, between: str = ", ") -> str:
        """``median [min<between>max]``, each formatted with ``spec``."""
        return f"{self.median:{spec}} [{self.min:{spec}}{between}{self.max:{spec}}]"


def _spread(xs: list[float | None]) -> dict | None:
    """``Spread.of(xs)`` as the JSON writes it."""
    spread = Spread.of(xs)
    return dataclasses.asdict(spread) if spread else None


def aggregate(results: dict[str, dict]) -> dict[str, dict]:
    """Per (config, method): median and range over repetitions of every figure of its runs."""
    groups: dict[str, list[dict]] = {}
    for r in results.values():
        groups.setdefault(f"{Path(r['config_file']).stem}:{r['method']}", []).append(r)
    out = {}
    for key, runs in groups.items():
        sums = [r["summary"] for r in runs]
        phases = sorted({p for s in sums for p in s["phases"]})
        out[key] = dict(
            method=runs[0]["method"],
            runs=len(runs),
            step_seconds=_spread([s["step_seconds"] for s in sums]),
            total_seconds=_spread([s["total_seconds"] for s in sums]),
            phases={p: _spread([s["phases"].get(p) for s in sums]) for p in phases},
            speedup=_spread([r["speedup"] for r in runs]),
            time_saved=_spread([r["time_saved"] for r in runs]),
            kept=_spread([r["kept"] for r in runs]),
            first_reward=_spread([s["first_reward"] for s in sums]),
            last_reward=_spread([s["task_reward"] for s in sums]),
            audit_abs_error=_spread([s["audit_abs_error"] for s in sums]),
        )
        rec = out[key]
        if rec["method"] == "recompute" and rec["step_seconds"] and rec["phases"].get("recompute_logp"):
            share = [s["recompute_logp_seconds"] / s["step_seconds"] for s in sums if s["step_seconds"]]
            rec["recompute_share"] = _spread(share)  # the physical limit: what a3po could save at most
            rec["limit_ratio"] = _spread([1 - x for x in share])
    return out


def _fmt(x: float | None, spec: str) -> str:
    return format(x, spec) if x is not None else "-"


def _range(d: dict | None, spec: str) -> str:
    """An aggregate's ``_spread`` as ``median [min-max]``."""
    return Spread(**d).format(spec, between="-") if d else "-"


def format_table(results: dict[str, dict], agg: dict[str, dict] | None = None) -> str:
    """Per run, then (with ``agg``) per method over repetitions: medians with [min–max]."""
    rows = []
    for name, r in results.items():
        s = r["summary"]
        rows.append([name, r["method"], _fmt(s["step_seconds"], ".3f"), _fmt(s["recompute_logp_seconds"], ".3f"),
                     _fmt(s["train_step_seconds"], ".3f"), _fmt(s["total_seconds"], ".0f"), _fmt(r["speedup"], ".3f"),
                     _fmt(r.get("kept"), ".0%"), f"{_fmt(s['first_reward'], '.3f')}->{_fmt(s['task_reward'], '.3f')}",
                     _fmt(s["audit_abs_error"], ".1e")])
    headers = ["run", "method", "s/step", "recompute", "train", "total s", "speedup", "kept", "reward", "audit"]
    lines = [table(rows, headers, align="llrrrrrrrr")]
    if agg:
        lines += ["", "per method (median [min-max] over repetitions; step times after warm-up, audited steps left out):"]
        for key, a in agg.items():
            phases = ", ".join(f"{p} {a['phases'][p]['median']:.3f}" for p in REPORTED_PHASES if a["phases"].get(p))
            lines.append(f"  {key}: {a['runs']} runs; s/step {_range(a['step_seconds'], '.3f')}; "
                         f"total s {_range(a['total_seconds'], '.0f')}")
            lines.append(f"    phases (s): {phases}")
            if a["method"] == "recompute" and a.get("recompute_share"):
                lines.append(f"    recompute phase = {_range(a['recompute_share'], '.1%')} of the step; the limit for "
                             f"any method that drops it: {_range(a['limit_ratio'], '.3f')} x the step")
            else:
                lines.append(f"    speedup vs recompute {_range(a['speedup'], '.3f')}x; "
                             f"time saved {_range(a['time_saved'], '.1%')}; "
                             f"share of the recompute phase kept {_range(a['kept'], '.0%')}")
            audit = ""
            if a["audit_abs_error"]:
                audit = f"; audited mean |d log pi_prox| {_range(a['audit_abs_error'], '.2e')}"
            lines.append(f"    reward first step {_range(a['first_reward'], '.3f')} -> "
                         f"last step {_range(a['last_reward'], '.3f')}{audit}")
    lines.append("reported elsewhere (not measured here): " + "; ".join(f"{k}: {v}" for k, v in REPORTED.items()))
    return "\n".join(lines)


def method_color(method: str) -> str:
    """A method's colour in every plot: matplotlib's cycle in ``METHODS`` order (any other method after them)."""
    names = list(METHODS)
    return f"C{(names.index(method) if method in names else len(names)) % 10}"


def plot_rewards(by_step, by_time, runs: Iterable[tuple[str, list]], ylabel: str) -> None:
    """Reward against the step (``by_step``) and against wall-clock seconds (``by_time``): one line per
    run, given as (method, ``reward_curve``), a method's runs in its colour and named once."""
    named = set()
    for method, curve in runs:
        curve = [c for c in curve if c[2] is not None]
        if not curve:
            continue
        style = dict(color=method_color(method), alpha=0.75, lw=1, label=None if method in named else method)
        named.add(method)
        by_step.plot([c[0] for c in curve], [c[2] for c in curve], **style)
        by_time.plot([c[1] for c in curve], [c[2] for c in curve], **style)
    for ax, xlabel in ((by_step, "step"), (by_time, "wall-clock seconds since the first step")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ax.get_lines():
            ax.legend(fontsize=7)


def plot(results: dict[str, dict], path: str) -> None:
    """Left: median s per step, recompute_logp against the rest; middle and right: reward by step
    and by wall-clock second of each run."""
    names = list(results)
    with figure(path, 1, 3, figsize=(max(12, 1.2 * len(names) + 8), 3.8)) as (_, (ax, by_step, by_time)):
        recompute = [results[n]["summary"]["recompute_logp_seconds"] or 0.0 for n in names]
        rest = [max((results[n]["summary"]["step_seconds"] or 0.0) - c, 0.0) for n, c in zip(names, recompute)]
        ax.bar(names, rest, label="rest of the step")
        ax.bar(names, recompute, bottom=rest, label="recompute_logp")
        ax.set_ylabel("median s per step")
        ax.tick_params(axis="x", labelrotation=60, labelsize=6)
        ax.legend(fontsize=7)
        plot_rewards(by_step, by_time, [(r["method"], r["summary"].get("reward_curve", [])) for r in results.values()],
                     "rollout reward")


def execute(run: dict, out_dir: Path, steps: int, pin: bool, progress: bool = True) -> tuple[list[dict], dict]:
    """Run one experiment as a user would (``launch``), its output in ``out_dir/<name>.log``; a progress
    bar from its committed stats; the affinity of its threads read once training has started."""
    command = (["taskset", "-c", "0"] if pin else []) + run["command"]
    env = {**without_spmd_env(os.environ), **run["env"]}
    if pin:  # the controller's thread variables reach AReaL's workers (instead of its own default)
        env.update({k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    log_path = out_dir / f"{run['name']}.log"
    print(f"=== {run['name']}: {' '.join(command)}\n    AReaL's output: {log_path}", flush=True)
    result = launch(command, log_file=log_path, stats=Path(log_dir(run["config"])) / STATS_FILE, env=env,
                    progress=(run["name"], steps) if progress else None, watch_cores=True)
    if result.returncode != 0 or not result.rows:
        raise SystemExit(f"run {run['name']} failed (exit {result.returncode}); see {log_path}")
    return result.rows, result.cores


def order(plans: list[list[dict]]) -> list[tuple[int, dict]]:
    """The runs of each repetition, reversed every other repetition (recompute, a3po | a3po, recompute | …)."""
    return [(rep, run) for rep, runs in enumerate(plans) for run in (runs if rep % 2 == 0 else runs[::-1])]


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
        from benchmarks.harness.models import build_model, model_shape
        from benchmarks.harness.tasks import reward_fn, reversal_dataset
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as d:
            build_model(d, synthetic, weights=False)
            tok = AutoTokenizer.from_pretrained(d)
            row = reversal_dataset(1)[0]
            text = tok.apply_chat_template(row["messages"], tokenize=False)
            ids = tok(text)["input_ids"]
            assert reward_fn(text, row["answer"], ids, [], row["answer"]) == 1.0
            shape = model_shape(synthetic)
            print(f"synthetic {synthetic}: {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
                  f"vocab {len(tok)}; prompt {text!r} -> {ids}, answer {row['answer']!r}; weights written at run time")


def main(argv: list[str] | None = None) -> dict:
    parser = output.parser(__doc__)
    parser.add_argument("--configs", nargs="+", required=True, help="experiment YAMLs, run in this order")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="run each config once per method")
    parser.add_argument("--steps", type=int, default=50, help="total_train_steps of each run")
    parser.add_argument("--repeats", type=int, default=1, help="run the list this many times, alternating the order")
    parser.add_argument("--seeds", action="store_true", help="repetition r runs with seed=r+1 (else every run has the YAML's seed)")
    parser.add_argument("--pin", action="store_true",
                        help="controller on core 0 with one thread (with configs/cpu_tiny_pinned.yaml: server core 0, trainer core 1)")
    parser.add_argument("--synthetic", nargs="?", const="qwen2.5-1.5b", default=None, metavar="SHAPE",
                        help="random model of SHAPE (qwen2.5-1.5b, tiny, cpu-tiny) and synthetic prompts")
    parser.add_argument("--override", nargs="*", action="extend", default=[],
                        help="extra Hydra overrides for every run (repeatable)")
    parser.add_argument("--logs", default=None, help="folder for each run's output (default: results/e2e-<time>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    output.output_options(parser, dry_run="build and print, run nothing",
                          plot="draw time per step and reward curves to this PNG")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    tag = time.strftime("%Y%m%d-%H%M%S")
    # One trial per run and repetition: AReaL would otherwise resume or append to an earlier one.
    plans = [plan_runs(args.configs, args.methods, args.steps, args.override, args.synthetic,
                       f"{tag}-r{rep}" if args.repeats > 1 else tag, seed=rep + 1 if args.seeds else None)
             for rep in range(args.repeats)]
    runs = plans[0]
    if args.dry_run:
        dry_run(runs, args.synthetic)
        return {"runs": [{k: v for k, v in r.items() if k != "config"} for r in runs]}

    out_dir = Path(args.logs or f"results/e2e-{tag}")
    results = {}
    for rep, run in order(plans):
        if args.repeats > 1:
            run = dict(run, name=f"{run['name']}-r{rep}")
        rows, cores = execute(run, out_dir, args.steps, args.pin, progress=not args.no_progress)
        results[run["name"]] = dict(method=run["method"], repeat=rep, config_file=run["config_file"], command=run["command"],
                                    cores=cores, summary=summarize_run(rows))
        if cores:
            print("    cores allowed: " + ", ".join(f"{k} {v}" for k, v in sorted(cores.items())), flush=True)
    compare(results)
    agg = aggregate(results)
    print(format_table(results, agg))
    out = dict(steps=args.steps, repeats=args.repeats, pin=args.pin, synthetic=args.synthetic, results=results,
               methods=agg, reported=REPORTED, logs=str(out_dir))
    output.save(out, args, functools.partial(plot, results))
    return out


if __name__ == "__main__":
    main()
