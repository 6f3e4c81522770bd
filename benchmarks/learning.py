"""Learning parity on a laptop: recompute vs A-3PO on a toy RL task under real staleness.

    python -m benchmarks.learning [--steps 48] [--seeds 3] [--max-staleness 4] [--json out.json] [--plot out.png]
    python -m benchmarks.learning --quick      # CI: pipeline end to end, recompute's and a3po-paper's rewards must rise

Task: reverse a string of digits. The prompt is ``<bos> d1 d2 =``; the response is 2 sampled
tokens; reward = mean over positions of 1 − |digit − target|/9 for a digit (target d2 d1), 0 for any
other token: exact answers score 1, near misses partial credit. The policy is a randomly initialised
tiny Qwen2 (built locally), trained from scratch with the real AReaL FSDP actor (the plugin's class),
the decoupled loss, group-normalised rewards (``--group`` samples per prompt) and batch-normalised
advantages.

Staleness as in an asynchronous run: at step s, each prompt group is sampled (``transformers`` on
CPU, ``benchmarks.harness.streams.SampledStream``) from that method's own weights of version s − d,
with d drawn uniformly up to ``--max-staleness``; every response token is tagged with version s − d
and prompt tokens with −1, as AReaL's inference engine does. Methods (``benchmarks.harness.variants``)
share seeds (prompts, staleness draws, initial weights) and are interleaved step by step
(``benchmarks.harness.loop``). Reported per method: reward of the current policy on a fixed
evaluation set (mean ± spread over seeds) vs step and vs trainer time, the final reward, and the
trainer's median seconds per step after the first (recompute forward + advantages + update, CPU;
the first step carries a one-off warm-up that the method training first pays) with its ratio to
recompute's.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from benchmarks.harness import variants as registry
from benchmarks.harness.loop import median_after_warmup
from benchmarks.harness.tasks import reversal_prompts, token_reward
from benchmarks import output
from benchmarks.output import figure, table

N_DIGITS = 2
#: ``--quick``: the methods that must both learn, and by how much the eval reward must rise.
QUICK_METHODS, QUICK_MARGIN = ("recompute", "a3po-paper"), 0.1


def make_prompts(n: int, generator: torch.Generator) -> torch.Tensor:
    """``<bos> d1 .. dN =`` as token ids, [n, N_DIGITS + 2]."""
    return reversal_prompts(n, N_DIGITS, generator)


def evaluate(sampler, weights: torch.Tensor, prompts: torch.Tensor, seed: int) -> float:
    """Mean reward of the policy with ``weights`` on fixed prompts (sampled, temperature 1)."""
    sampler.load(weights)
    ids, _ = sampler.sample(prompts, N_DIGITS, generator=torch.Generator().manual_seed(seed))
    return token_reward(prompts, ids[:, prompts.shape[1] :]).mean().item()


@dataclass(frozen=True)
class Settings:
    """The run: every method (a ``benchmarks.harness.variants`` name) trained ``steps`` steps per seed
    on ``n_prompts`` prompts × ``group`` samples per step, staleness ≤ ``max_staleness``, evaluated on
    ``n_eval`` fixed prompts every ``eval_every`` steps and at the end."""

    methods: tuple[str, ...] = registry.LEARNING
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 48
    max_staleness: int = 4
    n_prompts: int = 4
    group: int = 6
    minibatches: int = 2
    lr: float = 2e-3
    eval_every: int = 4
    n_eval: int = 64


def run(settings: Settings = Settings(), *, progress=None) -> dict:
    """Train every method on every seed; the points of each run, and ``summarize``'s summary."""
    with tempfile.TemporaryDirectory(prefix="a3po-learning-") as workdir:
        curves = {m: [] for m in settings.methods}
        for seed in settings.seeds:
            for m, points in _train(workdir, settings, seed, progress).items():
                curves[m].append(points)
    out = dataclasses.asdict(settings)
    out["methods"], out["seeds"] = list(settings.methods), list(settings.seeds)
    return dict(settings=out, curves=curves, summary=summarize(curves))


def _train(workdir: str, s: Settings, seed: int, progress) -> dict[str, list[dict]]:
    """One seed: every method interleaved; per method its points (step 0: the initial evaluation)."""
    from areal.api.cli_args import NormConfig

    from benchmarks.harness.actor import make_actor, parameters
    from benchmarks.harness.loop import Lane, by_lane, run_interleaved
    from benchmarks.harness.models import build_model
    from benchmarks.harness.streams import Sampler, SampledStream

    model = build_model(f"{workdir}/model-{seed}", "toy", seed=seed)
    sampler = Sampler(model)
    eval_prompts = make_prompts(s.n_eval, torch.Generator().manual_seed(10_000 + seed))
    common = dict(
        ppo_n_minibatches=s.minibatches, max_tokens_per_mb=N_DIGITS + 2 + N_DIGITS, lr=s.lr,
        reward_norm=NormConfig(mean_level="group", std_level="group", group_size=s.group),
        adv_norm=NormConfig(mean_level="batch", std_level="batch"),
        pad_to_maximum=True,  # pad each one-sequence micro-batch to its length, not to 256 tokens
    )
    variants = [registry.get(m) for m in s.methods]
    actors = [make_actor(model, **v.actor_options(), **common) for v in variants]
    lanes = []
    for v, actor in zip(variants, actors):
        snapshots = [parameters(actor)]
        # Same prompts and staleness draws for every method: one generator per method, same seed.
        stream = SampledStream(sampler, snapshots, prompts=lambda g: make_prompts(s.n_prompts, g), new_tokens=N_DIGITS,
                               reward=token_reward, group=s.group, max_staleness=v.staleness(s.max_staleness),
                               generator=torch.Generator().manual_seed(seed))
        lanes.append(Lane(v.name, actor, stream, v, snapshots))
    points = {lane.name: [dict(step=0, trainer_time=0.0, eval_reward=evaluate(sampler, lane.snapshots[0], eval_prompts, seed))]
              for lane in lanes}
    records = run_interleaved(
        lanes, s.steps, progress=progress,
        evaluate=lambda lane: evaluate(sampler, lane.snapshots[-1], eval_prompts, seed),
        eval_at=lambda version: version % s.eval_every == 0 or version == s.steps,
    )
    for name, rows in by_lane(records).items():
        trainer_time = 0.0
        for r in rows:
            trainer_time += r.total
            point = dict(step=r.step + 1, trainer_time=trainer_time, step_seconds=r.total, train_reward=r.reward,
                         staleness=r.staleness)
            if r.eval_reward is not None:
                point["eval_reward"] = r.eval_reward
            points[name].append(point)
    return points


def _step_seconds(run_points: list[dict]) -> list[float]:
    """Seconds of each trained step of one run (its points after the initial evaluation)."""
    return [p["step_seconds"] for p in run_points[1:]]


def _median_step(run_points: list[dict]) -> float:
    """Median seconds per step after the first (whose one-off warm-up the method that trains first pays)."""
    return median_after_warmup(_step_seconds(run_points), float)


def _evals(run_points: list[dict]) -> list[tuple[int, float, float]]:
    """(step, trainer time without warm-up, eval reward) at each evaluation of one run: the time sums
    the steps' seconds with the first step's counted as the run's median step."""
    seconds = _step_seconds(run_points)
    if seconds:
        seconds[0] = _median_step(run_points)
    elapsed = [0.0]
    for x in seconds:
        elapsed.append(elapsed[-1] + x)
    return [(p["step"], elapsed[p["step"]], p["eval_reward"]) for p in run_points if "eval_reward" in p]


def summarize(curves: dict) -> dict:
    """Per method, means over seeds: the eval reward at the start, at the end (± sd over seeds) and
    over the last three evaluations; ``step_time``, the median seconds per step after the first;
    ``first_step_time`` (warm-up included) and ``trainer_time``, all steps' seconds summed."""
    out = {}
    for m, runs in curves.items():
        finals = [_evals(r)[-1][2] for r in runs]
        starts = [_evals(r)[0][2] for r in runs]
        # the last three evaluations, averaged: less noisy than the final one alone
        lasts = [statistics.fmean(e[2] for e in _evals(r)[-3:]) for r in runs]
        out[m] = dict(
            initial_reward=statistics.fmean(starts),
            final_reward=statistics.fmean(finals),
            final_reward_spread=(statistics.stdev(finals) if len(finals) > 1 else 0.0),
            last3_reward=statistics.fmean(lasts),
            step_time=statistics.fmean(_median_step(r) for r in runs),
            first_step_time=statistics.fmean(r[1]["step_seconds"] for r in runs),
            trainer_time=statistics.fmean(r[-1]["trainer_time"] for r in runs),
        )
    return out


def format_table(result: dict) -> str:
    s = result["summary"]
    base = s.get("recompute", {}).get("step_time")
    rows = [[m, f"{r['initial_reward']:.3f}", f"{r['final_reward']:.3f} ± {r['final_reward_spread']:.3f}",
             f"{r['last3_reward']:.3f}", f"{r['step_time']:.3f}", f"{r['step_time'] / base:.2f}x" if base else "-",
             f"{r['first_step_time']:.2f} s", f"{r['trainer_time']:.1f} s"]
            for m, r in s.items()]
    return (table(rows, ["method", "initial", "final (± sd)", "last 3 evals", "s/step", "vs recompute", "first step",
                         "all steps"])
            + "\n(s/step: median trainer seconds per step after the first, whose warm-up is paid by the method that "
            "trains first; vs recompute: ratio of those medians)")


def plot(result: dict, path: str) -> None:
    with figure(path, 1, 2, figsize=(10, 3.6), sharey=True) as (fig, axes):
        for m, runs in result["curves"].items():
            evals = [_evals(r) for r in runs]
            steps = [e[0] for e in evals[0]]
            rewards = torch.tensor([[e[2] for e in ev] for ev in evals])
            mean, lo, hi = rewards.mean(0), rewards.min(0).values, rewards.max(0).values
            times = torch.tensor([[e[1] for e in ev] for ev in evals]).mean(0)
            for ax, x in ((axes[0], steps), (axes[1], times.tolist())):
                ax.plot(x, mean.tolist(), marker="o", ms=3, label=m)
                ax.fill_between(x, lo.tolist(), hi.tolist(), alpha=0.15)
        axes[0].set_xlabel("training step")
        axes[1].set_xlabel("trainer time (s, CPU; first step counted as the median step)")
        axes[0].set_ylabel("eval reward (mean, min–max over seeds)")
        axes[1].legend(fontsize=8)
        settings = result["settings"]
        fig.suptitle(f"Digit reversal, staleness ≤ {settings['max_staleness']}, {len(settings['seeds'])} seed(s)")


def quick_check(result: dict) -> bool:
    """``--quick``: every method of ``QUICK_METHODS`` raises its eval reward (mean of the last three
    evaluations) by more than ``QUICK_MARGIN`` above the initial one; prints one line per method."""
    ok = True
    for m in QUICK_METHODS:
        r = result["summary"][m]
        rose = r["last3_reward"] > r["initial_reward"] + QUICK_MARGIN
        ok &= rose
        print(f"quick check: {m} eval reward {r['initial_reward']:.3f} -> {r['last3_reward']:.3f} (last 3 evals): "
              f"{'rises' if rose else f'DOES NOT RISE by {QUICK_MARGIN}'}")
    return ok


def main(argv: list[str] | None = None) -> dict:
    parser = output.parser(__doc__)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    parser.add_argument("--max-staleness", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per batch")
    parser.add_argument("--group", type=int, default=6, help="samples per prompt")
    parser.add_argument("--minibatches", type=int, default=2, help="actor.ppo_n_minibatches")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=list(registry.LEARNING), choices=list(registry.VARIANTS))
    parser.add_argument("--sync", action="store_true", help=f"also train the synchronous on-policy reference ({registry.REFERENCE!r})")
    parser.add_argument("--quick", action="store_true", help=f"CI check: 1 seed, {' + '.join(QUICK_METHODS)}, 20 steps; "
                        f"exit 1 unless both eval rewards rise by more than {QUICK_MARGIN}")
    output.output_options(parser, json="write all points to this file",
                          plot="draw reward vs step and vs trainer time to this PNG")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.methods, args.eval_every = 20, 1, list(QUICK_METHODS), 5
    methods = list(args.methods) + ([registry.REFERENCE] if args.sync and registry.REFERENCE not in args.methods else [])
    settings = Settings(methods=tuple(methods), seeds=tuple(range(args.seeds)), steps=args.steps, max_staleness=args.max_staleness,
                        n_prompts=args.prompts, group=args.group, minibatches=args.minibatches, lr=args.lr,
                        eval_every=args.eval_every)

    from tqdm import tqdm

    start = time.perf_counter()
    with tqdm(total=args.steps * args.seeds * len(methods), desc="steps x methods x seeds", unit="step") as bar:
        result = run(settings, progress=bar.update)
    result["wall_seconds"] = time.perf_counter() - start
    print(format_table(result))
    output.save(result, args, functools.partial(plot, result))
    if args.quick and not quick_check(result):
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
