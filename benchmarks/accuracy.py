"""π_prox accuracy: every approximation against AReaL's recomputed π_prox, by staleness and minibatch.

    python -m benchmarks.accuracy [--max-staleness 8] [--minibatches 1 2 4] [--json out.json] [--plot out.png]

Realistic staleness on the real AReaL FSDP actor (tiny Qwen2, CPU): for each n, the policy is
first trained for ``--max-staleness`` steps (AReaL's recompute with ``ppo_n_minibatches`` n, on its
own samples, rewarded for emitting digits) to get weight snapshots at versions 0..K. Then, for each staleness d and each ``ppo_n_minibatches`` n, a fresh actor at
version k = K takes one PPO step on a batch **sampled** by the snapshot k − d (the toy inference
engine, ``areal_a3po.toy.Sampler``; every response token has version k − d, prompt −1).

The step trains on the recomputed π_prox (the plugin's fallback mode, so θ follows AReaL's
recompute path exactly) while the plugin's audit measures, in every minibatch j, each method's
π_prox against the recomputed one: the a3po anchors ``paper`` and ``recompute`` with both
interpolations, and AReaL's built-in ``loglinear`` (its formula on its unaligned versions).
Reported: mean and max |Δ log π_prox|, behaviour-weight error |Δ π_prox/π_behave|, the share of
tokens whose PPO clip decision differs, by staleness and by minibatch index.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile

import torch

from benchmarks.output import save

#: method label -> (interpolation of the actor that measures it, stats prefix under audit/)
METHODS = {
    "a3po recompute/loglinear": ("loglinear", ""),
    "a3po paper/loglinear": ("loglinear", "anchor_paper/"),
    "a3po recompute/linear": ("linear", ""),
    "a3po paper/linear": ("linear", "anchor_paper/"),
    "AReaL loglinear": ("loglinear", "areal_loglinear/"),
}
AUDIT = "ppo_actor/update/a3po/audit/"
TARGET_METHOD, BASELINE = "a3po recompute/loglinear", "AReaL loglinear"


def _sampled_batch(sampler, snapshot, *, version, n_seqs, prompt_len, new_tokens, seed):
    from areal_a3po.toy import VOCAB, Rollout

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, len(VOCAB), (n_seqs, prompt_len), generator=g)
    sampler.load(snapshot)
    ids, logprobs = sampler.sample(prompts, new_tokens, generator=g)
    loss_mask = torch.zeros_like(ids, dtype=torch.int32)
    loss_mask[:, prompt_len:] = 1
    versions = torch.where(loss_mask.bool(), version, -1)
    return Rollout(ids, loss_mask, versions, logprobs, digit_reward(ids[:, prompt_len:]))


def digit_reward(responses: torch.Tensor) -> torch.Tensor:
    """Share of response tokens that are digits: a reward the policy can learn, so that it drifts in
    a consistent direction from version to version, as a policy that is learning does."""
    from areal_a3po.toy import VOCAB

    digits = torch.tensor([VOCAB.index(str(i)) for i in range(10)])
    return torch.isin(responses, digits).float().mean(-1)


def run(max_staleness=8, minibatches=(1, 2, 4), n_seqs=16, prompt_len=8, new_tokens=16, lr=2e-3, seed=0, progress=None) -> dict:
    with tempfile.TemporaryDirectory(prefix="a3po-accuracy-") as workdir:
        return _run(workdir, max_staleness, list(minibatches), n_seqs, prompt_len, new_tokens, lr, seed, progress)


def _run(workdir, K, minibatches, n_seqs, prompt_len, new_tokens, lr, seed, progress):
    from areal.utils import stats_tracker

    from areal_a3po.demo import train_step
    from areal_a3po.toy import Sampler, build_tiny_model, load_parameters, make_actor, parameters

    model = build_tiny_model(f"{workdir}/model", seed=seed)
    seq_len = prompt_len + new_tokens
    sampler = Sampler(model)
    batch = dict(n_seqs=n_seqs, prompt_len=prompt_len, new_tokens=new_tokens)

    cells = []  # one per (n, d, method)
    for n in minibatches:
        # One actor per n, in the plugin's recompute (fallback) mode: it trains exactly like AReaL's
        # recompute while its audit measures every approximation. History: K on-policy steps,
        # snapshots at versions 0..K; then, from the same weights *and optimizer state* at version
        # K, one step per (staleness, interpolation).
        actor = make_actor(
            model, prox_logp_method="a3po", anchor="recompute", ppo_n_minibatches=n, max_tokens_per_mb=seq_len, lr=lr,
            a3po_options={"audit_interval": 1, "fallback": {"threshold": 1e9, "recover_after": 0}},
        )
        actor.actor.load_state_dict({"fallback": {"mode": "recompute"}})
        snapshots = [parameters(actor)]
        for v in range(K):
            rollout = _sampled_batch(sampler, snapshots[v], version=v, seed=seed * 7919 + v, **batch)
            train_step(actor, rollout.trajectories(), version=v)
            snapshots.append(parameters(actor))
        optimizer_state = copy.deepcopy(actor.optimizer.state_dict())
        for d in range(K + 1):
            rollout = _sampled_batch(sampler, snapshots[K - d], version=K - d, seed=seed * 7919 + 1000 + 10 * n + d, **batch)
            for interpolation in ("loglinear", "linear"):
                load_parameters(actor, snapshots[K])
                actor.optimizer.load_state_dict(copy.deepcopy(optimizer_state))
                actor.config.a3po.interpolation = interpolation  # read by the next update
                stats_tracker.export_all()
                train_step(actor, rollout.trajectories(), version=K)
                stats = stats_tracker.export_all()
                for method, (interp, prefix) in METHODS.items():
                    if interp != interpolation:
                        continue
                    cells.append(dict(
                        minibatches=n, staleness=d, method=method,
                        abs_error=stats[f"{AUDIT}{prefix}abs_error/avg"],
                        max_abs_error=stats[f"{AUDIT}{prefix}abs_error/max"],
                        behave_weight_error=stats[f"{AUDIT}{prefix}behave_imp_weight_abs_error/avg"],
                        clip_disagreement=stats[f"{AUDIT}{prefix}clip_disagreement/avg"],
                        by_minibatch=[stats[f"{AUDIT}minibatch_{j}/{prefix}abs_error/avg"] for j in range(n)],
                    ))
                if progress is not None:
                    progress()
        del actor
    settings = dict(max_staleness=K, minibatches=minibatches, n_seqs=n_seqs, prompt_len=prompt_len, new_tokens=new_tokens, lr=lr, seed=seed)
    return dict(settings=settings, cells=cells, summary=summarize(cells))


def summarize(cells: list[dict]) -> dict:
    """Per (n, method): mean error over staleness, per-minibatch means, and the two targets."""
    out: dict = {"by_minibatches": {}}
    for n in sorted({c["minibatches"] for c in cells}):
        per_method = {}
        for method in METHODS:
            mine = [c for c in cells if c["minibatches"] == n and c["method"] == method]
            per_method[method] = dict(
                abs_error=statistics.fmean(c["abs_error"] for c in mine),
                max_abs_error=max(c["max_abs_error"] for c in mine),
                behave_weight_error=statistics.fmean(c["behave_weight_error"] for c in mine),
                clip_disagreement=statistics.fmean(c["clip_disagreement"] for c in mine),
                by_minibatch=[statistics.fmean(c["by_minibatch"][j] for c in mine) for j in range(n)],
            )
        out["by_minibatches"][str(n)] = per_method
    one = out["by_minibatches"].get("1")
    four = out["by_minibatches"].get("4")
    out["targets"] = {
        "recompute_anchor_max_error_1_minibatch": one[TARGET_METHOD]["max_abs_error"] if one else None,
        "areal_over_recompute_anchor_mean_error_4_minibatches": (
            four[BASELINE]["abs_error"] / max(four[TARGET_METHOD]["abs_error"], 1e-12) if four else None
        ),
    }
    return out


def format_tables(result: dict) -> str:
    cells, K = result["cells"], result["settings"]["max_staleness"]
    lines = []
    for n, per_method in result["summary"]["by_minibatches"].items():
        lines.append(f"\nppo_n_minibatches={n}: mean |Δ log π_prox| by staleness d")
        lines.append(f"{'method':<26}" + "".join(f"{'d=' + str(d):>9}" for d in range(K + 1)) + f"{'all':>10}{'max':>10}{'|Δ w|':>10}{'clip≠':>8}")
        for method, s in per_method.items():
            row = {c["staleness"]: c["abs_error"] for c in cells if c["minibatches"] == int(n) and c["method"] == method}
            lines.append(
                f"{method:<26}" + "".join(f"{row[d]:>9.1e}" for d in range(K + 1))
                + f"{s['abs_error']:>10.2e}{s['max_abs_error']:>10.2e}{s['behave_weight_error']:>10.2e}{s['clip_disagreement']:>8.2%}"
            )
        if int(n) > 1:
            lines.append(f"  by minibatch j (mean over d): " + "; ".join(
                f"{m}: " + " ".join(f"{e:.1e}" for e in s["by_minibatch"]) for m, s in per_method.items()
            ))
    t = result["summary"]["targets"]
    if t["recompute_anchor_max_error_1_minibatch"] is not None:
        ok = t["recompute_anchor_max_error_1_minibatch"] <= 1e-6
        lines.append(f"\ntarget: anchor 'recompute' exact with 1 minibatch (max error ≤ 1e-6): "
                     f"{t['recompute_anchor_max_error_1_minibatch']:.1e} {'MET' if ok else 'MISSED'}")
    if t["areal_over_recompute_anchor_mean_error_4_minibatches"] is not None:
        r = t["areal_over_recompute_anchor_mean_error_4_minibatches"]
        lines.append(f"target: ≥5x lower mean error than AReaL loglinear with 4 minibatches: {r:.1f}x {'MET' if r >= 5 else 'MISSED'}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = result["summary"]["by_minibatches"]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], groups):
        for method in METHODS:
            pts = sorted((c["staleness"], c["abs_error"]) for c in result["cells"] if c["minibatches"] == int(n) and c["method"] == method)
            ax.plot([p[0] for p in pts], [max(p[1], 1e-9) for p in pts], marker="o", ms=3, label=method)
        ax.set_yscale("log")
        ax.set_title(f"ppo_n_minibatches={n}")
        ax.set_xlabel("staleness d = k − v")
    axes[0][0].set_ylabel("mean |Δ log π_prox| (floor 1e-9)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-staleness", type=int, default=8, help="K: staleness 0..K, trainer at version K")
    parser.add_argument("--minibatches", type=int, nargs="+", default=[1, 2, 4], help="ppo_n_minibatches values")
    parser.add_argument("--seqs", type=int, default=16, help="sequences per batch")
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16, help="sampled response tokens per sequence")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write all figures to this file")
    parser.add_argument("--plot", help="draw error vs staleness (one line per method) to this PNG")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    total = 2 * len(args.minibatches) * (args.max_staleness + 1)
    with tqdm(total=total, desc="(n, d, interpolation)", unit="step") as bar:
        result = run(args.max_staleness, args.minibatches, args.seqs, args.prompt_len, args.new_tokens, args.lr, args.seed, progress=bar.update)
    print(format_tables(result))
    save(result, args.json, lambda path: plot(result, path), args.plot)
    return result


if __name__ == "__main__":
    main()
