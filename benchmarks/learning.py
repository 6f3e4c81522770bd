"""Learning parity on a laptop: recompute vs A-3PO on a toy RL task under real staleness.

    python -m benchmarks.learning [--steps 48] [--seeds 3] [--max-staleness 4] [--json out.json] [--plot out.png]
    python -m benchmarks.learning --quick      # CI: pipeline end to end, recompute's reward must rise

Task: reverse a string of digits. The prompt is ``<bos> d1 d2 =``; the response is 2 sampled
tokens; reward = mean over positions of 1 − |digit − target|/9 for a digit (target d2 d1), 0 for any
other token: exact answers score 1, near misses partial credit. The policy is a randomly initialised tiny Qwen2 (built locally),
trained from scratch with the real AReaL FSDP actor (the plugin's class), the decoupled loss,
group-normalised rewards (``--group`` samples per prompt) and batch-normalised advantages.

Staleness as in an asynchronous run: at step s, each prompt group is sampled (``transformers`` on
CPU, ``benchmarks.harness.streams.Sampler``) from that method's own weights of version s − d, with d drawn
uniformly up to ``--max-staleness``; every response token is tagged with version s − d and prompt
tokens with −1, as AReaL's inference engine does. Methods share seeds (prompts, staleness draws,
initial weights) and are interleaved step by step. Reported per method: reward of the current
policy on a fixed evaluation set (mean ± spread over seeds) vs step and vs trainer time, and the
final reward and total trainer time (recompute forward + advantages + update, CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from benchmarks.harness.tasks import reversal_prompts, token_reward
from benchmarks.output import save

METHODS = {
    "recompute": dict(prox_logp_method="recompute"),
    "a3po-paper": dict(prox_logp_method="a3po", anchor="paper"),
    "a3po-recompute": dict(prox_logp_method="a3po", anchor="recompute"),
    "areal-loglinear": dict(prox_logp_method="loglinear"),
    "sync (on-policy)": dict(prox_logp_method="recompute"),  # reference: staleness 0 always
}
DEFAULT_METHODS = ("recompute", "a3po-paper", "a3po-recompute", "areal-loglinear")
N_DIGITS = 2


def make_prompts(n: int, generator: torch.Generator) -> torch.Tensor:
    """``<bos> d1 .. dN =`` as token ids, [n, N_DIGITS + 2]."""
    return reversal_prompts(n, N_DIGITS, generator)


def evaluate(sampler, weights: torch.Tensor, prompts: torch.Tensor, seed: int) -> float:
    """Mean reward of the policy with ``weights`` on fixed prompts (sampled, temperature 1)."""
    sampler.load(weights)
    ids, _ = sampler.sample(prompts, N_DIGITS, generator=torch.Generator().manual_seed(seed))
    return token_reward(prompts, ids[:, prompts.shape[1] :]).mean().item()


def stale_batch(sampler, snapshots, step, *, n_prompts, group, max_staleness, generator):
    """One batch consumed at ``step``: each prompt group sampled by the snapshot of version step − d."""
    from benchmarks.harness.streams import Rollout

    prompts = make_prompts(n_prompts, generator)
    ds = torch.randint(0, min(max_staleness, step) + 1, (n_prompts,), generator=generator)
    P = prompts.shape[1]
    ids = torch.zeros(n_prompts * group, P + N_DIGITS, dtype=torch.long)
    logprobs = torch.zeros(ids.shape)
    versions = torch.full(ids.shape, -1)
    for d in ds.unique().tolist():
        rows = [i for i in range(n_prompts) if ds[i] == d]
        sel = torch.tensor([i * group + g for i in rows for g in range(group)])
        sampler.load(snapshots[step - d])
        out, lp = sampler.sample(prompts[rows].repeat_interleave(group, 0), N_DIGITS, generator=generator)
        ids[sel], logprobs[sel] = out, lp
        versions[sel, P:] = step - d
    loss_mask = torch.zeros(ids.shape, dtype=torch.int32)
    loss_mask[:, P:] = 1
    rewards = token_reward(ids[:, :P], ids[:, P:])
    return Rollout(ids, loss_mask, versions, logprobs, rewards), ds.float().mean().item()


def run(methods=DEFAULT_METHODS, seeds=(0, 1, 2), steps=48, max_staleness=4, n_prompts=4, group=6,
        minibatches=2, lr=2e-3, eval_every=4, n_eval=64, progress=None) -> dict:
    with tempfile.TemporaryDirectory(prefix="a3po-learning-") as workdir:
        return _run(workdir, list(methods), list(seeds), steps, max_staleness, n_prompts, group, minibatches, lr, eval_every, n_eval, progress)


def _run(workdir, methods, seeds, steps, max_staleness, n_prompts, group, minibatches, lr, eval_every, n_eval, progress):
    from areal.api.cli_args import NormConfig
    from areal.utils import stats_tracker

    from benchmarks.harness.actor import train_step
    from benchmarks.harness.streams import Sampler
    from benchmarks.harness.models import build_model
    from benchmarks.harness.actor import make_actor, parameters

    seq_len = N_DIGITS + 2 + N_DIGITS
    curves: dict[str, list[list[dict]]] = {m: [] for m in methods}
    for seed in seeds:
        model = build_model(f"{workdir}/model-{seed}", "toy", seed=seed)
        sampler = Sampler(model)
        eval_prompts = make_prompts(n_eval, torch.Generator().manual_seed(10_000 + seed))
        common = dict(
            ppo_n_minibatches=minibatches, max_tokens_per_mb=seq_len, lr=lr,
            reward_norm=NormConfig(mean_level="group", std_level="group", group_size=group),
            adv_norm=NormConfig(mean_level="batch", std_level="batch"),
            pad_to_maximum=True,  # pad each one-sequence micro-batch to seq_len, not to 256 tokens
        )
        actors = {m: make_actor(model, **METHODS[m], **common) for m in methods}
        snapshots = {m: [parameters(a)] for m, a in actors.items()}
        # Same prompts and staleness draws for every method: one generator per method, same seed.
        gens = {m: torch.Generator().manual_seed(seed) for m in methods}
        trainer_time = {m: 0.0 for m in methods}
        points = {m: [dict(step=0, trainer_time=0.0, eval_reward=evaluate(sampler, snapshots[m][0], eval_prompts, seed))] for m in methods}
        for step in range(steps):
            for m in methods:  # interleaved
                stale = 0 if m.startswith("sync") else max_staleness
                rollout, mean_d = stale_batch(sampler, snapshots[m], step, n_prompts=n_prompts, group=group, max_staleness=stale, generator=gens[m])
                timings: dict[str, float] = {}
                train_step(actors[m], rollout.trajectories(), version=step, timings=timings)
                trainer_time[m] += sum(timings.values())
                stats_tracker.export_all()  # as AReaL's trainer does each step; the tracker grows otherwise
                snapshots[m].append(parameters(actors[m]))
                point = dict(step=step + 1, trainer_time=trainer_time[m], train_reward=rollout.rewards.mean().item(), staleness=mean_d)
                if (step + 1) % eval_every == 0 or step + 1 == steps:
                    point["eval_reward"] = evaluate(sampler, snapshots[m][-1], eval_prompts, seed)
                points[m].append(point)
                if progress is not None:
                    progress()
        for m in methods:
            curves[m].append(points[m])
        del actors
    settings = dict(methods=methods, seeds=seeds, steps=steps, max_staleness=max_staleness, n_prompts=n_prompts,
                    group=group, minibatches=minibatches, lr=lr, eval_every=eval_every, n_eval=n_eval)
    return dict(settings=settings, curves=curves, summary=summarize(curves))


def _evals(run_points):
    return [(p["step"], p["trainer_time"], p["eval_reward"]) for p in run_points if "eval_reward" in p]


def summarize(curves: dict) -> dict:
    out = {}
    for m, runs in curves.items():
        finals = [_evals(r)[-1][2] for r in runs]
        starts = [_evals(r)[0][2] for r in runs]
        times = [r[-1]["trainer_time"] for r in runs]
        # the last three evaluations, averaged: less noisy than the final one alone
        lasts = [statistics.fmean(e[2] for e in _evals(r)[-3:]) for r in runs]
        out[m] = dict(
            initial_reward=statistics.fmean(starts),
            final_reward=statistics.fmean(finals),
            final_reward_spread=(statistics.stdev(finals) if len(finals) > 1 else 0.0),
            last3_reward=statistics.fmean(lasts),
            trainer_time=statistics.fmean(times),
        )
    return out


def format_table(result: dict) -> str:
    s = result["summary"]
    base = s.get("recompute", {}).get("trainer_time")
    lines = [f"{'method':<18}{'initial':>9}{'final (± sd)':>16}{'last 3 evals':>14}{'trainer time':>14}{'vs recompute':>14}"]
    for m, r in s.items():
        ratio = f"{r['trainer_time'] / base:.2f}x" if base else "-"
        lines.append(f"{m:<18}{r['initial_reward']:>9.3f}{r['final_reward']:>9.3f} ± {r['final_reward_spread']:.3f}"
                     f"{r['last3_reward']:>14.3f}{r['trainer_time']:>12.1f} s{ratio:>14}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
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
    axes[1].set_xlabel("trainer time (s, CPU)")
    axes[0].set_ylabel("eval reward (mean, min–max over seeds)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Digit reversal, staleness ≤ {result['settings']['max_staleness']}, {len(result['settings']['seeds'])} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    parser.add_argument("--max-staleness", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per batch")
    parser.add_argument("--group", type=int, default=6, help="samples per prompt")
    parser.add_argument("--minibatches", type=int, default=2, help="actor.ppo_n_minibatches")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    parser.add_argument("--sync", action="store_true", help="also train the synchronous on-policy reference")
    parser.add_argument("--quick", action="store_true", help="CI check: 1 seed, recompute + a3po-paper, 20 steps; "
                        "exit 1 unless recompute's eval reward rises")
    parser.add_argument("--json", help="write all points to this file")
    parser.add_argument("--plot", help="draw reward vs step and vs trainer time to this PNG")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.methods, args.eval_every = 20, 1, ["recompute", "a3po-paper"], 5
    methods = list(args.methods) + (["sync (on-policy)"] if args.sync else [])

    from tqdm import tqdm

    start = time.perf_counter()
    with tqdm(total=args.steps * args.seeds * len(methods), desc="steps x methods x seeds", unit="step") as bar:
        result = run(methods, range(args.seeds), args.steps, args.max_staleness, args.prompts, args.group,
                     args.minibatches, args.lr, args.eval_every, progress=bar.update)
    result["settings"]["seeds"] = list(range(args.seeds))
    result["wall_seconds"] = time.perf_counter() - start
    print(format_table(result))
    save(result, args.json, lambda path: plot(result, path), args.plot)
    if args.quick:
        r = result["summary"]["recompute"]
        rose = r["last3_reward"] > r["initial_reward"] + 0.1
        print(f"quick check: recompute eval reward {r['initial_reward']:.3f} -> {r['last3_reward']:.3f} (last 3 evals): "
              f"{'rises' if rose else 'DOES NOT RISE'}")
        if not rose:
            sys.exit(1)
    return result


if __name__ == "__main__":
    main()
