"""Time saved against the recompute phase's share of the step, with learning alongside, through AReaL's real loop.

    python -m benchmarks.share --json results/share.json --plot results/share.png   # the family (3.5 h on 2 cores)
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

import dataclasses
import functools
import json
import statistics
import sys
import time
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

from benchmarks import e2e_speedup as e2e
from benchmarks import output
from benchmarks.e2e_speedup import Spread
from benchmarks.output import figure, table

#: The Setup-1 share: the recompute forward's share of the trainer's step for Qwen2.5-1.5B's shape
#: on an H100 (``benchmarks.gpu_phases``, docs/results.md §3).
SETUP1_SHARE = 0.255
#: What the paper reports (abstract) and the authors' Setup 1 (1.82 h -> 1.53 h).
PAPER_SAVING, SETUP1_SAVING = 0.18, 1 - 1.53 / 1.82
AUDIT_INTERVAL = 10
FINAL = 10  # steps averaged for the final reward
METHODS = ("recompute", "a3po-paper", "a3po-recompute")
CLIP_KEY = "ppo_actor/update/clip_ratio/avg"
#: The plugin's version-tag keys (``areal_a3po.rollout_engines.TAG_STATS``, ``areal_a3po.loss.log_tag_check``).
RETAGGED_KEY, AMBIGUOUS_KEY = "rollout/a3po/version_tags/retagged_tokens", "rollout/a3po/version_tags/ambiguous_tokens"
CHECKED_KEY, SUSPECT_KEY = "ppo_actor/update/a3po/tag_check/tokens", "ppo_actor/update/a3po/tag_check/suspect_tokens"


@dataclass(frozen=True)
class Point:
    """One experiment of the family: a config and the overrides that make it this point."""

    config: str
    steps: int  # total_train_steps of each run
    model: str  # in words, for the table
    overrides: tuple[str, ...] = ()
    setup1: bool = False  # the point at Setup 1's share (make demo's)


TINY = "configs/cpu_tiny_pinned.yaml"
POINTS = {
    # Weights through disk: about 1.1 s of every step is AReaL's disk sync (its server side polls the
    # name service once a second), which dilutes the recompute forward's share.
    "tiny-disk": Point(TINY, 16, "2 layers, hidden 128, 12 new tokens, disk sync", ("actor.weight_update_mode=disk",)),
    # Gradient checkpointing: the update runs the forward twice, so the recompute forward is a smaller share.
    "tiny-ckpt": Point(TINY, 16, "2 layers, hidden 128, 12 new tokens, gradient checkpointing",
                       ("actor.gradient_checkpointing=true",)),
    "tiny": Point(TINY, 24, "2 layers, hidden 128, 12 new tokens"),
    "mid": Point("configs/cpu_mid_pinned.yaml", 24, "2 layers, hidden 256, 24 new tokens"),
    "wide": Point("configs/cpu_wide_pinned.yaml", 60, "4 layers, hidden 256, 24 new tokens", setup1=True),
    # The same experiment on SGLang, the paper's server; run it with .venv-sglang's python (make install).
    "wide-sglang": Point("configs/cpu_wide_pinned_sglang.yaml", 60, "4 layers, hidden 256, 24 new tokens, SGLang"),
}


def point_of(name: str) -> Point | None:
    """The point a result's name stands for: ``wide`` and ``wide@areal-2.0.0`` (``--label``) are ``wide``."""
    return POINTS.get(name.split("@")[0])
DEMO = dict(points=["wide"], methods=["recompute", "a3po-paper"], repeats=1, steps=16)


def plan_point(name: str, point: Point, methods: list[str], repeats: int, steps: int | None, overrides: list[str],
               tag: str, first: int = 0) -> list[tuple[int, dict]]:
    """The runs of one point in the order they run: (repetition, run) as ``e2e_speedup.plan_runs`` plans
    them, repetitions ``first`` … ``first + repeats − 1`` (seed = repetition + 1)."""
    audit = f"actor.a3po.audit_interval={AUDIT_INTERVAL}"  # for the a3po methods (AReaL's ignore actor.a3po)
    plans = []
    for rep in range(first, first + repeats):
        runs = []
        for method in methods:
            extra = [*point.overrides, *([audit] if method.startswith("a3po") else []), *overrides]
            runs += e2e.plan_runs([point.config], [method], steps or point.steps, extra, None, f"{tag}-{name}-r{rep}",
                                  seed=rep + 1)
        plans.append(runs)
    return [(first + rep, run) for rep, run in e2e.order(plans)]


def run_point(name: str, planned: list[tuple[int, dict]], steps: int, out_dir: Path, progress: bool) -> dict[str, dict]:
    """Every run of one point, in order; {run name: record} as ``e2e_speedup`` records runs (the JSON's ``results``),
    with the AReaL that ran it."""
    from importlib.metadata import version

    results = {}
    for rep, run in planned:
        run = dict(run, name=f"{name}-{run['method']}-r{rep}")
        rows, cores = e2e.execute(run, out_dir, steps, pin=True, progress=progress)
        results[run["name"]] = dict(point=name, method=run["method"], repeat=rep, seed=rep + 1,
                                    config_file=run["config_file"], command=run["command"], cores=cores,
                                    areal=version("areal"), summary=e2e.summarize_run(rows), rows=rows)
    return e2e.compare(results)


def final_reward(summary: dict) -> float | None:
    rewards = [c[2] for c in summary.get("reward_curve", []) if c[2] is not None]
    return statistics.fmean(rewards[-FINAL:]) if rewards else None


def tag_figures(run: dict) -> tuple[float | None, float | None, float | None]:
    """Of one run's steps: the tokens per generation whose tag the plugin changed from AReaL's (AReaL tagged
    them with a version that did not serve them), those it could not tell (mean over steps of each
    step's mean), and the share of the checked tokens (tagged current, minibatch 0) whose log π_behave is
    off log π_θ by more than ``loss.TAG_CHECK_GAP``. None: not logged (AReaL's own engines; recompute
    runs log no tag check)."""
    rows = run.get("rows", [])
    retagged = [r[RETAGGED_KEY] for r in rows if r.get(RETAGGED_KEY) is not None]
    ambiguous = [r[AMBIGUOUS_KEY] for r in rows if r.get(AMBIGUOUS_KEY) is not None]
    checked = sum(r.get(CHECKED_KEY) or 0 for r in rows)
    suspect = sum(r.get(SUSPECT_KEY) or 0 for r in rows)
    return (statistics.fmean(retagged) if retagged else None, statistics.fmean(ambiguous) if ambiguous else None,
            suspect / checked if checked else None)


def clip_ratio(run: dict) -> float | None:
    """The share of trained tokens whose PPO ratio π_θ/π_prox was clipped, averaged over the run's steps
    (AReaL's ``ppo_actor/update/clip_ratio``): how often the trust region stopped a token's gradient."""
    values = [r[CLIP_KEY] for r in run.get("rows", []) if r.get(CLIP_KEY) is not None]
    return statistics.fmean(values) if values else None


@dataclass(frozen=True)
class RunFigures:
    """What the summary reads of one run's record (``run_point``'s, or a JSON's ``results``)."""

    point: str
    method: str
    repeat: int
    steps: int
    step_seconds: float | None
    recompute_seconds: float | None  # AReaL's recompute_logp phase
    train_step_seconds: float | None
    seq_len: float | None
    first_reward: float | None
    final_reward: float | None
    audit_abs_error: float | None
    clip_ratio: float | None
    summary: dict  # e2e_speedup.summarize_run's, for e2e_speedup.against
    tags: tuple[float | None, float | None, float | None] = (None, None, None)  # tag_figures

    @classmethod
    def of(cls, record: dict) -> RunFigures:
        s = record["summary"]
        return cls(record["point"], record["method"], record["repeat"], s["steps"], s["step_seconds"],
                   s["recompute_logp_seconds"], s["train_step_seconds"], s.get("seq_len"), s["first_reward"],
                   final_reward(s), s["audit_abs_error"], clip_ratio(record), s, tag_figures(record))

    def against(self, recompute: RunFigures) -> dict:
        """This run paired with a recompute run: ``e2e_speedup.against``'s speedup, time saved, kept share."""
        return e2e.against(self.summary, recompute.summary)


@dataclass(frozen=True)
class MethodSummary:
    """One method at one point: its runs' figures (``Spread``: median and range) and, paired with the
    recompute run of the same repetition, the time it saves and the share of the recompute phase it keeps."""

    runs: int
    step_seconds: Spread | None
    train_step_seconds: Spread | None
    seq_len: Spread | None
    time_saved: Spread | None
    kept: Spread | None
    #: train_step (the update alone: no recompute forward in either) against the recompute run of the same
    #: repetition: what the method costs inside the update, and the run-to-run noise of the trainer.
    train_step_vs_recompute: Spread | None
    #: The same per token (train_step / mean sequence length, against recompute's): what is left of that
    #: difference once the runs' sequence lengths (their policies differ) are taken out.
    train_step_per_token_vs_recompute: Spread | None
    final_reward: Spread | None
    first_reward: Spread | None
    audit_abs_error: Spread | None
    clip_ratio: Spread | None
    #: Over the method's runs: tokens per generation AReaL tagged with a version that did not serve them
    #: (the plugin retagged them), tokens whose serving version could not be told, and the share of
    #: tokens tagged current whose behaviour gap is above ``loss.TAG_CHECK_GAP`` (tag_figures).
    retagged: Spread | None
    ambiguous: Spread | None
    suspect_share: Spread | None
    finals: dict[int, float | None]  # the final reward per repetition
    #: The final reward minus recompute's, per repetition (None for recompute).
    final_reward_vs_recompute: Spread | None


@dataclass(frozen=True)
class PointSummary:
    """One point of the family: its recompute share and its methods' summaries."""

    point: str
    config: str | None
    model: str
    steps: int  # of the point's full-length runs, the ones its learning figures read
    recompute_share: Spread | None  # R_rec / T_rec of its recompute runs
    methods: dict[str, MethodSummary]
    seed_spread: float | None  # the largest max − min of a method's final reward


def summarize(results: dict[str, dict]) -> dict[str, PointSummary]:
    """Per point: the recompute share, and per method the time saved, the kept share, the final reward.

    Timing pairs every run with the recompute run of its point and repetition (here, not from the stored
    per-run figures: runs merged from several files pair within their point); learning reads the runs of
    the point's full length only (shorter repetitions, added for timing, are left out of it)."""
    runs = [RunFigures.of(r) for r in results.values()]
    names = dict.fromkeys(r.point for r in runs)
    return {name: _summarize_point(name, [r for r in runs if r.point == name]) for name in names}


def _summarize_point(name: str, runs: list[RunFigures]) -> PointSummary:
    full = max(r.steps for r in runs)
    recompute = {r.repeat: r for r in runs if r.method == "recompute"}
    share = Spread.of(r.recompute_seconds / r.step_seconds for r in recompute.values()
                      if r.step_seconds and r.recompute_seconds)
    recompute_finals = _finals([r for r in runs if r.method == "recompute"], full)
    methods = {}
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        methods[method] = _summarize_method(method, mine, recompute, recompute_finals, full)
    spreads = [m.final_reward.max - m.final_reward.min for m in methods.values() if m.final_reward]
    point = point_of(name)
    return PointSummary(name, point.config if point else None, point.model if point else "", full, share, methods,
                        max(spreads) if spreads else None)


def _finals(runs: list[RunFigures], full: int) -> dict[int, float | None]:
    """The final reward of each repetition among the full-length ``runs``."""
    return {r.repeat: r.final_reward for r in sorted(runs, key=attrgetter("repeat")) if r.steps == full}


def _summarize_method(method: str, runs: list[RunFigures], recompute: dict[int, RunFigures],
                      recompute_finals: dict[int, float | None], full: int) -> MethodSummary:
    mine = sorted(runs, key=attrgetter("repeat"))
    learning = [r for r in mine if r.steps == full]
    paired = [(r, recompute[r.repeat]) for r in mine if r.repeat in recompute] if method != "recompute" else []
    finals = _finals(mine, full)
    diffs = [f - recompute_finals[k] for k, f in finals.items()
             if f is not None and recompute_finals.get(k) is not None]
    return MethodSummary(
        runs=len(mine),
        step_seconds=Spread.of(r.step_seconds for r in mine),
        train_step_seconds=Spread.of(r.train_step_seconds for r in mine),
        seq_len=Spread.of(r.seq_len for r in mine),
        time_saved=Spread.of(r.against(rec)["time_saved"] for r, rec in paired),
        kept=Spread.of(r.against(rec)["kept"] for r, rec in paired),
        train_step_vs_recompute=Spread.of(r.train_step_seconds / rec.train_step_seconds - 1 for r, rec in paired),
        train_step_per_token_vs_recompute=Spread.of(
            (r.train_step_seconds / r.seq_len) / (rec.train_step_seconds / rec.seq_len) - 1
            for r, rec in paired if r.seq_len and rec.seq_len),
        final_reward=Spread.of(finals.values()),
        first_reward=Spread.of(r.first_reward for r in learning),
        audit_abs_error=Spread.of(r.audit_abs_error for r in learning),
        clip_ratio=Spread.of(r.clip_ratio for r in learning),
        retagged=Spread.of(r.tags[0] for r in mine),
        ambiguous=Spread.of(r.tags[1] for r in mine),
        suspect_share=Spread.of(r.tags[2] for r in mine),
        finals=finals,
        final_reward_vs_recompute=Spread.of(diffs) if method != "recompute" else None,
    )


def _spread_text(spread: Spread | None, spec: str) -> str:
    return spread.format(spec) if spread else "-"


def format_table(points: dict[str, PointSummary]) -> str:
    timing = []
    for name, p in points.items():
        methods = [m for m in p.methods if m != "recompute"] + (["recompute"] if "recompute" in p.methods else [])
        for i, method in enumerate(methods):
            m = p.methods[method]
            where = [name, p.model, _spread_text(p.recompute_share, ".1%")] if i == 0 else ["", "", ""]
            seconds = f"{m.step_seconds.median:.2f}"
            length = f"{m.seq_len.median:.1f}" if m.seq_len else "-"
            if method == "recompute":  # the baseline: its seconds per step only
                figures = ["", "", seconds, length, "", ""]
            else:
                figures = [_spread_text(m.time_saved, ".1%"), _spread_text(m.kept, ".1%"), seconds, length,
                           _spread_text(m.train_step_vs_recompute, "+.1%"),
                           _spread_text(m.train_step_per_token_vs_recompute, "+.1%")]
            timing.append([*where, method, *figures])
    learning = []
    for name, p in points.items():
        for method, m in p.methods.items():
            audit = f"{m.audit_abs_error.median:.2e}" if m.audit_abs_error else "-"
            clipped = f"{m.clip_ratio.median:.1%}" if m.clip_ratio else "-"
            learning.append([name, method, _spread_text(m.first_reward, ".3f"), _spread_text(m.final_reward, ".3f"),
                             _spread_text(m.final_reward_vs_recompute, "+.3f"), audit, clipped])
    tags = [[name, method, _spread_text(m.retagged, ".2f"), _spread_text(m.ambiguous, ".2f"),
             _spread_text(m.suspect_share, ".2%")]
            for name, p in points.items() for method, m in p.methods.items()
            if m.retagged or m.suspect_share]
    seeds = "; ".join(f"{name} {p.seed_spread:.3f}" for name, p in points.items() if p.seed_spread is not None)
    return "\n".join([
        "Time saved against the recompute phase's share of the step (medians over alternated pairs [min, max]);",
        "the limit is saving = share (everything the recompute forward cost, and nothing else).",
        "",
        table(timing, ["point", "model", "recompute share", "method", "time saved", "kept share", "s/step",
                       "seq len", "train_step vs recompute", "per token"], align="llllllrrll"),
        "",
        "Learning (the same runs, those of each point's full length; final reward = mean of the last "
        f"{FINAL} steps, median over seeds [min, max]):",
        table(learning, ["point", "method", "reward first step", "final reward", "final minus recompute's, per seed",
                         "audited mean |Δ log π_prox|", "tokens clipped"], align="lllllrr"),
        f"Seed spread of the final reward (largest max − min of a method): {seeds or '-'}.",
        *(["", "Version tags (median over runs [min, max]; per generation: tokens the plugin retagged from AReaL's "
           "tag, tokens it could not tell; share of tokens tagged current with |log π_behave − log π_θ| > 1e-2):",
           table(tags, ["point", "method", "retagged / generation", "ambiguous / generation", "suspect share"],
                 align="llrrr")] if tags else []),
        f"Reported: paper {PAPER_SAVING:.0%} less training time; authors' Setup 1 1.82 h -> 1.53 h "
        f"({SETUP1_SAVING:.0%}); Setup 1's recompute share on an H100 (benchmarks.gpu_phases) {SETUP1_SHARE:.1%}.",
    ])


def plot(points: dict[str, PointSummary], results: dict[str, dict], path: str) -> None:
    """Left: time saved against the recompute share, per method (ranges as bars), the limit line and
    the paper's figures. Middle and right: reward by step and by wall-clock second at the learning point."""
    with figure(path, 1, 3, figsize=(16, 4.6)) as (_, (ax, by_step, by_time)):
        _saving_panel(ax, points)
        learning = next((name for name in points if name in POINTS and POINTS[name].setup1), next(iter(points)))
        steps = points[learning].steps
        full = [r for r in results.values() if r["point"] == learning and r["summary"]["steps"] == steps]
        curves = [(method, r["summary"]["reward_curve"]) for method in points[learning].methods
                  for r in full if r["method"] == method]
        e2e.plot_rewards(by_step, by_time, curves, f"rollout reward ({learning}; one line per seed)")


def _saving_panel(ax, points: dict[str, PointSummary]) -> None:
    shares = [p.recompute_share.max for p in points.values() if p.recompute_share]
    saved = [m.time_saved.max for p in points.values() for m in p.methods.values() if m.time_saved]
    top = max(shares + [SETUP1_SHARE] + saved) * 1.1
    ax.plot([0, top], [0, top], color="grey", lw=1, label="limit: saving = share")
    ax.axvline(SETUP1_SHARE, color="grey", ls=":", lw=1, label=f"Setup 1's share on an H100 ({SETUP1_SHARE:.1%})")
    ax.axhline(PAPER_SAVING, color="black", ls="--", lw=1, label=f"paper: {PAPER_SAVING:.0%} less time")
    named = set()
    for name, p in points.items():
        s = p.recompute_share
        if not s:
            continue
        shown = [method for method, m in p.methods.items() if method != "recompute" and m.time_saved]
        for i, method in enumerate(shown):
            t = p.methods[method].time_saved
            x = s.median + 0.004 * (i - (len(shown) - 1) / 2)  # the methods side by side
            ax.errorbar(x, t.median, xerr=[[s.median - s.min], [s.max - s.median]],
                        yerr=[[t.median - t.min], [t.max - t.median]], fmt="o", color=e2e.method_color(method),
                        capsize=3, label=None if method in named else method)
            named.add(method)
        if shown:
            low = max(min(p.methods[m].time_saved.min for m in shown), 0.02 * top)  # inside the axes
            ax.annotate(name, (s.median, low), textcoords="offset points", xytext=(0, -10), fontsize=7, ha="center")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("recompute phase / step (recompute runs)")
    ax.set_ylabel("time saved per step (1 − T / T_recompute)")
    ax.legend(fontsize=7, loc="upper left")


def main(argv: list[str] | None = None) -> dict:
    parser = output.parser(__doc__)
    parser.add_argument("--points", nargs="+", choices=list(POINTS), default=list(POINTS))
    parser.add_argument("--methods", nargs="+", choices=list(e2e.METHODS), default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="alternated repetitions per point (seeds 1..R)")
    parser.add_argument("--first-repeat", type=int, default=0,
                        help="number the repetitions (and seeds) from here: more repetitions for runs already "
                             "in a JSON")
    parser.add_argument("--steps", type=int, default=None,
                        help="total_train_steps of every run (default: each point's)")
    parser.add_argument("--demo", action="store_true",
                        help="make demo's defaults: " + ", ".join(f"{k}={v}" for k, v in DEMO.items()))
    parser.add_argument("--override", nargs="*", action="extend", default=[],
                        help="extra Hydra overrides for every run")
    parser.add_argument("--from-json", nargs="+",
                        help="read the runs from these files (written by --json) instead of running them")
    parser.add_argument("--label", default="",
                        help="name the points <point>@<label> in the results (e.g. areal-2.0.0: the same point "
                             "under another AReaL, to merge with --from-json beside the first)")
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
        planned = {name: plan_point(name, POINTS[name], args.methods, args.repeats, args.steps, args.override, tag,
                                    args.first_repeat)
                   for name in args.points}  # every config validated before anything runs
        if args.dry_run:
            return dry_run(planned, args.first_repeat, args.repeats)
        out_dir = Path(args.logs or f"results/share-{tag}")
        results = {}
        for name, runs in planned.items():
            label = f"{name}@{args.label}" if args.label else name
            results.update(run_point(label, runs, args.steps or POINTS[name].steps, out_dir, not args.no_progress))
    points = summarize(results)
    print(format_table(points))
    out = dict(points={name: dataclasses.asdict(p) for name, p in points.items()}, results=results,
               setup1_share=SETUP1_SHARE, paper_saving=PAPER_SAVING)
    output.save(out, args, functools.partial(plot, points, results))
    return out


def dry_run(planned: dict[str, list[tuple[int, dict]]], first: int, repeats: int) -> dict:
    """Print every point's runs (``e2e_speedup.dry_run``); the runs without their config objects."""
    for name, runs in planned.items():
        print(f"point {name} ({POINTS[name].model}): {len(runs)} runs, alternated, seeds {first + 1}-{first + repeats}")
        e2e.dry_run([run for _, run in runs], None)
    return {"runs": [{k: v for k, v in run.items() if k != "config"} for runs in planned.values() for _, run in runs]}


if __name__ == "__main__":
    main()
