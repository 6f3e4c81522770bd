"""Time saved against the recompute phase's share of the step, with learning alongside, through AReaL's real loop.

    python -m benchmarks.share --json results/share.json --plot results/share.png      # the family (about 3.5 h on 2 cores)
    python -m benchmarks.share --points wide --repeats 1 --steps 12 --methods recompute a3po-paper   # one pair
    python -m benchmarks.share --demo          # `make demo`: the Setup-1-share point, recompute against a3po, once
    python -m benchmarks.share --from-json a.json b.json --json all.json --plot share.png   # table and plot again

Each point is a CPU experiment (``POINTS``) whose recompute forward is a different share of the
trainer's step: the model's size sets how much of the step is the trainer's compute and how much
fixed work (RPCs, the weight push, advantages). Every run is pinned (server on core 0, trainer on
core 1: the setting of a GPU cluster, where both have devices of their own) and pushes its weights
over ``xccl``. A repetition runs every method once, the order reversed every other repetition, all
methods of repetition r with ``seed = r + 1`` (the same model at the start, other prompts and
samples), so the repetitions are the seeds of the learning curves too.

Per point, from AReaL's own timings (``benchmarks.e2e_speedup``: medians after the first step,
audited steps left out): the **recompute share** R_rec / T_rec of the recompute runs; per a3po method
and repetition, paired with the recompute run of that repetition, the **time saved** 1 − T / T_rec
and the **kept share** (T_rec − T) / R_rec (1: all that the recompute forward cost is saved; the
saving can at most equal the share: the limit line). Medians over pairs and their range.

Learning, at every point: the reward of each step against the step and against wall-clock seconds;
the **final reward** (the mean of the last ``FINAL`` steps of a run), its median over seeds per method
and its difference to recompute next to the seed spread; and the audited π_prox error (a3po runs
audit every ``AUDIT_INTERVAL`` steps; their timing leaves audited steps out).
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import e2e_speedup as e2e
from benchmarks import output

#: The Setup-1 share: the recompute forward's share of the trainer's step for Qwen2.5-1.5B's shape
#: on an H100 (``benchmarks.gpu_phases``, docs/results.md §3).
SETUP1_SHARE = 0.255
#: What the paper reports (abstract) and the authors' Setup 1 (1.82 h -> 1.53 h).
PAPER_SAVING, SETUP1_SAVING = 0.18, 1 - 1.53 / 1.82
AUDIT_INTERVAL = 10
FINAL = 10  # steps averaged for the final reward
METHODS = ("recompute", "a3po-paper", "a3po-recompute")
CLIP_KEY = "ppo_actor/update/clip_ratio/avg"


@dataclass(frozen=True)
class Point:
    """One experiment of the family: a config and the overrides that make it this point."""

    config: str
    steps: int  # total_train_steps of each run
    model: str  # in words, for the table
    overrides: tuple[str, ...] = ()
    setup1: bool = False  # the point at Setup 1's share (make demo's)


POINTS = {
    # Weights through disk: about 1.1 s of every step is AReaL's disk sync (its server side polls the
    # name service once a second), which dilutes the recompute forward's share.
    "tiny-disk": Point("configs/cpu_tiny_pinned.yaml", 16, "2 layers, hidden 128, 12 new tokens, disk sync",
                       ("actor.weight_update_mode=disk",)),
    # Gradient checkpointing: the update runs the forward twice, so the recompute forward is a smaller share.
    "tiny-ckpt": Point("configs/cpu_tiny_pinned.yaml", 16, "2 layers, hidden 128, 12 new tokens, gradient checkpointing",
                       ("actor.gradient_checkpointing=true",)),
    "tiny": Point("configs/cpu_tiny_pinned.yaml", 24, "2 layers, hidden 128, 12 new tokens"),
    "mid": Point("configs/cpu_mid_pinned.yaml", 24, "2 layers, hidden 256, 24 new tokens"),
    "wide": Point("configs/cpu_wide_pinned.yaml", 60, "4 layers, hidden 256, 24 new tokens", setup1=True),
}
DEMO = dict(points=["wide"], methods=["recompute", "a3po-paper"], repeats=1, steps=16)


def plan_point(name: str, point: Point, methods: list[str], repeats: int, steps: int | None, overrides: list[str],
               tag: str, first: int = 0) -> list[tuple[int, dict]]:
    """The runs of one point in the order they run: (repetition, run) as ``e2e_speedup.plan_runs`` plans
    them, repetitions ``first`` … ``first + repeats − 1`` (seed = repetition + 1)."""
    steps = steps or point.steps
    audit = [f"actor.a3po.audit_interval={AUDIT_INTERVAL}"]  # for the a3po methods (AReaL's ignore actor.a3po)
    plans = [[run for m in methods for run in e2e.plan_runs([point.config], [m], steps,
                                                            [*point.overrides, *(audit if m.startswith("a3po") else []), *overrides],
                                                            None, f"{tag}-{name}-r{rep}", seed=rep + 1)]
             for rep in range(first, first + repeats)]
    return [(first + rep, run) for rep, run in e2e.order(plans)]


def run_point(name: str, planned: list[tuple[int, dict]], steps: int, out_dir: Path, progress: bool) -> dict[str, dict]:
    """Every run of one point, in order; {run name: result} as ``e2e_speedup`` records them."""
    results = {}
    for rep, run in planned:
        run = dict(run, name=f"{name}-{run['method']}-r{rep}")
        rows, cores = e2e.execute(run, out_dir, steps, pin=True, progress=progress)
        results[run["name"]] = dict(point=name, method=run["method"], repeat=rep, seed=rep + 1, config_file=run["config_file"],
                                    command=run["command"], cores=cores, summary=e2e.summarize_run(rows), rows=rows)
    return e2e.compare(results)


def _spread(xs) -> dict | None:
    xs = [x for x in xs if x is not None]
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs), n=len(xs)) if xs else None


def final_reward(summary: dict) -> float | None:
    rewards = [c[2] for c in summary.get("reward_curve", []) if c[2] is not None]
    return statistics.fmean(rewards[-FINAL:]) if rewards else None


def clip_ratio(run: dict) -> float | None:
    """The share of trained tokens whose PPO ratio π_θ/π_prox was clipped, averaged over the run's steps
    (AReaL's ``ppo_actor/update/clip_ratio``): how often the trust region stopped a token's gradient."""
    values = [r[CLIP_KEY] for r in run.get("rows", []) if r.get(CLIP_KEY) is not None]
    return statistics.fmean(values) if values else None


def summarize(results: dict[str, dict]) -> dict[str, dict]:
    """Per point: the recompute share, and per method the time saved, the kept share, the final reward.

    Timing pairs every run with the recompute run of its point and repetition (here, not from the stored
    per-run figures: runs merged from several files pair within their point); learning reads the runs of the
    point's full length only (shorter repetitions, added for timing, are left out of it)."""
    out = {}
    for name in dict.fromkeys(r["point"] for r in results.values()):
        runs = [r for r in results.values() if r["point"] == name]
        full = max(r["summary"]["steps"] for r in runs)
        rec = {r["repeat"]: r for r in runs if r["method"] == "recompute"}
        share = _spread([r["summary"]["recompute_logp_seconds"] / r["summary"]["step_seconds"] for r in rec.values()
                         if r["summary"]["step_seconds"] and r["summary"]["recompute_logp_seconds"]])
        methods = {}
        for method in dict.fromkeys(r["method"] for r in runs):
            mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["repeat"])
            learning = [r for r in mine if r["summary"]["steps"] == full]
            finals = {r["repeat"]: final_reward(r["summary"]) for r in learning}
            paired = [r for r in mine if r["repeat"] in rec] if method != "recompute" else []
            methods[method] = dict(
                runs=len(mine),
                step_seconds=_spread([r["summary"]["step_seconds"] for r in mine]),
                train_step_seconds=_spread([r["summary"]["train_step_seconds"] for r in mine]),
                seq_len=_spread([r["summary"].get("seq_len") for r in mine]),
                time_saved=_spread([e2e.against(r["summary"], rec[r["repeat"]]["summary"])["time_saved"] for r in paired]),
                kept=_spread([e2e.against(r["summary"], rec[r["repeat"]]["summary"])["kept"] for r in paired]),
                # train_step (the update alone: no recompute forward in either) against the recompute run of the
                # same repetition: what the method costs inside the update, and the run-to-run noise of the trainer
                train_step_vs_recompute=_spread([r["summary"]["train_step_seconds"] / rec[r["repeat"]]["summary"]["train_step_seconds"] - 1
                                                 for r in paired]),
                final_reward=_spread(list(finals.values())),
                first_reward=_spread([r["summary"]["first_reward"] for r in learning]),
                audit_abs_error=_spread([r["summary"]["audit_abs_error"] for r in learning]),
                clip_ratio=_spread([clip_ratio(r) for r in learning]),
                finals=finals,
            )
        rec_finals = methods["recompute"]["finals"] if "recompute" in methods else {}
        for method, m in methods.items():
            diffs = [f - rec_finals[k] for k, f in m["finals"].items() if f is not None and rec_finals.get(k) is not None]
            m["final_reward_vs_recompute"] = _spread(diffs) if method != "recompute" else None
        spreads = [m["final_reward"]["max"] - m["final_reward"]["min"] for m in methods.values() if m["final_reward"]]
        out[name] = dict(point=name, config=POINTS[name].config if name in POINTS else None, model=POINTS[name].model if name in POINTS else "",
                         steps=full, recompute_share=share, methods=methods, seed_spread=max(spreads) if spreads else None)
    return out


def format_table(points: dict[str, dict]) -> str:
    pct = lambda d: f"{d['median']:.1%} [{d['min']:.1%}, {d['max']:.1%}]" if d else "-"  # noqa: E731
    signed = lambda d: f"{d['median']:+.1%} [{d['min']:+.1%}, {d['max']:+.1%}]" if d else "-"  # noqa: E731
    num = lambda d, spec=".3f": f"{format(d['median'], spec)} [{format(d['min'], spec)}, {format(d['max'], spec)}]" if d else "-"  # noqa: E731
    lines = ["Time saved against the recompute phase's share of the step (medians over alternated pairs [min, max]);",
             "the limit is saving = share (everything the recompute forward cost, and nothing else).", "",
             f"{'point':<11}{'model':<52}{'recompute share':<24}{'method':<16}{'time saved':<24}{'kept share':<24}{'s/step':<8}"
             f"{'train_step vs recompute':<24}"]
    for name, p in points.items():
        first = True
        for method, m in p["methods"].items():
            if method == "recompute":
                continue
            lines.append(f"{name if first else '':<11}{p['model'] if first else '':<52}{pct(p['recompute_share']) if first else '':<24}"
                         f"{method:<16}{pct(m['time_saved']):<24}{pct(m['kept']):<24}{m['step_seconds']['median']:<8.2f}"
                         f"{signed(m['train_step_vs_recompute']):<24}")
            first = False
        rec = p["methods"].get("recompute")
        if rec:
            lines.append(f"{'':<11}{'':<52}{'':<24}{'recompute':<16}{'':<24}{'':<24}{rec['step_seconds']['median']:.2f}")
    lines += ["", "Learning (the same runs, those of each point's full length; final reward = mean of the last %d steps,"
              " median over seeds [min, max]):" % FINAL]
    for name, p in points.items():
        for method, m in p["methods"].items():
            diff = m.get("final_reward_vs_recompute")
            lines.append(f"  {name:<10} {method:<15} reward {num(m['first_reward'])} -> {num(m['final_reward'])}"
                         + (f"; minus recompute's, per seed: {num(diff, '+.3f')}" if diff else "")
                         + (f"; audited mean |Δ log π_prox| {m['audit_abs_error']['median']:.2e}" if m["audit_abs_error"] else "")
                         + (f"; tokens clipped {m['clip_ratio']['median']:.1%}" if m.get("clip_ratio") else ""))
        if p.get("seed_spread") is not None:
            lines.append(f"  {name:<10} seed spread of the final reward (largest max − min of a method): {p['seed_spread']:.3f}")
    lines.append(f"Reported: paper {PAPER_SAVING:.0%} less training time; authors' Setup 1 1.82 h -> 1.53 h ({SETUP1_SAVING:.0%}); "
                 f"Setup 1's recompute share on an H100 (benchmarks.gpu_phases) {SETUP1_SHARE:.1%}.")
    return "\n".join(lines)


def plot(points: dict[str, dict], results: dict[str, dict], path: str) -> None:
    """Left: time saved against the recompute share, per method (ranges as bars), the limit line and
    the paper's figures. Middle and right: reward by step and by wall-clock second at the learning point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, by_step, by_time) = plt.subplots(1, 3, figsize=(16, 4.6))
    top = max([p["recompute_share"]["max"] for p in points.values() if p["recompute_share"]] + [SETUP1_SHARE]
              + [m["time_saved"]["max"] for p in points.values() for m in p["methods"].values() if m.get("time_saved")]) * 1.1
    ax.plot([0, top], [0, top], color="grey", lw=1, label="limit: saving = share")
    ax.axvline(SETUP1_SHARE, color="grey", ls=":", lw=1, label=f"Setup 1's share on an H100 ({SETUP1_SHARE:.1%})")
    ax.axhline(PAPER_SAVING, color="black", ls="--", lw=1, label=f"paper: {PAPER_SAVING:.0%} less time")
    color = lambda method: f"C{list(e2e.METHODS).index(method) % 10}"  # noqa: E731  (the same in every panel)
    labelled = set()
    for name, p in points.items():
        s = p["recompute_share"]
        if not s:
            continue
        shown = [m for m in p["methods"] if m != "recompute" and p["methods"][m]["time_saved"]]
        for i, method in enumerate(shown):
            t = p["methods"][method]["time_saved"]
            x = s["median"] + 0.004 * (i - (len(shown) - 1) / 2)  # the methods side by side
            ax.errorbar(x, t["median"], xerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]],
                        yerr=[[t["median"] - t["min"]], [t["max"] - t["median"]]], fmt="o", color=color(method), capsize=3,
                        label=None if method in labelled else method)
            labelled.add(method)
        if shown:
            low = max(min(p["methods"][m]["time_saved"]["min"] for m in shown), 0.02 * top)  # inside the axes
            ax.annotate(name, (s["median"], low), textcoords="offset points", xytext=(0, -10), fontsize=7, ha="center")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("recompute phase / step (recompute runs)")
    ax.set_ylabel("time saved per step (1 − T / T_recompute)")
    ax.legend(fontsize=7, loc="upper left")
    learning = next((n for n, p in points.items() if POINTS.get(n, Point("", 0, "")).setup1), next(iter(points)))
    for i, method in enumerate(points[learning]["methods"]):
        runs = [r for r in results.values() if r["point"] == learning and r["method"] == method
                and r["summary"]["steps"] == points[learning]["steps"]]
        for j, r in enumerate(runs):
            curve = [c for c in r["summary"]["reward_curve"] if c[2] is not None]
            kw = dict(color=color(method), alpha=0.75, lw=1, label=method if j == 0 else None)
            by_step.plot([c[0] for c in curve], [c[2] for c in curve], **kw)
            by_time.plot([c[1] for c in curve], [c[2] for c in curve], **kw)
    for a, label in ((by_step, "step"), (by_time, "wall-clock seconds since the first step")):
        a.set_xlabel(label)
        a.set_ylabel(f"rollout reward ({learning}; one line per seed)")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = output.parser(__doc__)
    parser.add_argument("--points", nargs="+", choices=list(POINTS), default=list(POINTS))
    parser.add_argument("--methods", nargs="+", choices=list(e2e.METHODS), default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="alternated repetitions per point (seeds 1..R)")
    parser.add_argument("--first-repeat", type=int, default=0,
                        help="number the repetitions (and seeds) from here: more repetitions for runs already in a JSON")
    parser.add_argument("--steps", type=int, default=None, help="total_train_steps of every run (default: each point's)")
    parser.add_argument("--demo", action="store_true", help="make demo's defaults: " + ", ".join(f"{k}={v}" for k, v in DEMO.items()))
    parser.add_argument("--override", nargs="*", action="extend", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--from-json", nargs="+", help="read the runs from these files (written by --json) instead of running them")
    parser.add_argument("--logs", default=None, help="folder for each run's output (default: results/share-<time>)")
    parser.add_argument("--no-progress", action="store_true")
    output.output_options(parser, json="write every run and the summary to this file",
                          plot="draw the saving against the share and the reward curves to this PNG",
                          dry_run="load and validate every run's config, print the commands, run nothing")
    if "--demo" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**DEMO)  # the demo's settings, unless given (make demo ARGS="--steps 30")
    args = parser.parse_args(argv)
    if "recompute" not in args.methods:
        parser.error("--methods must include recompute: every saving is measured against it")

    if args.from_json:
        results = {k: v for path in args.from_json for k, v in json.loads(Path(path).read_text())["results"].items()}
    else:
        tag = time.strftime("%Y%m%d-%H%M%S")
        planned = {name: plan_point(name, POINTS[name], args.methods, args.repeats, args.steps, args.override, tag, args.first_repeat)
                   for name in args.points}  # every config validated before anything runs
        if args.dry_run:
            for name, runs in planned.items():
                print(f"point {name} ({POINTS[name].model}): {len(runs)} runs, alternated, "
                      f"seeds {args.first_repeat + 1}-{args.first_repeat + args.repeats}")
                e2e.dry_run([run for _, run in runs], None)
            return {"runs": [{k: v for k, v in run.items() if k != "config"} for runs in planned.values() for _, run in runs]}
        out_dir = Path(args.logs or f"results/share-{tag}")
        results = {}
        for name, runs in planned.items():
            results.update(run_point(name, runs, args.steps or POINTS[name].steps, out_dir, not args.no_progress))
    points = summarize(results)
    print(format_table(points))
    out = dict(points=points, results=results, setup1_share=SETUP1_SHARE, paper_saving=PAPER_SAVING)
    output.save(out, args, functools.partial(plot, points, results))
    return out


if __name__ == "__main__":
    main()
