"""Trainer-step time per phase: AReaL's recompute, AReaL's loglinear and A-3PO (both anchors).

    python -m benchmarks.step_time [--steps 30] [--json out.json] [--plot out.png]

All variants train the same tiny Qwen2 (real AReaL FSDP actor, CPU) on stale batches generated the
same way (``areal_a3po.demo``), interleaved step by step in one process so machine noise hits all
alike. Reported per phase: median and interquartile range over the steps after the first; the
per-step ratio variant/recompute (median); the **limit ratio** (recompute step − recompute phase) /
recompute step, the best any approximation can do; and the interpolation's own cost, timed alone on
a batch of the same size, as a share of the recompute step. CPU timings: ratios, not absolute times,
are what carry over.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

PHASES = ("recompute_logp", "compute_advantage", "train_step", "total")
VARIANTS = ("recompute", "areal-loglinear", "a3po-paper", "a3po-recompute")


def _quartiles(xs: list[float]) -> dict[str, float]:
    if len(xs) == 1:
        return dict(median=xs[0], p25=xs[0], p75=xs[0])
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return dict(median=statistics.median(xs), p25=q[0], p75=q[2])


def interpolation_cost(n_tokens: int, repeats: int = 200) -> float:
    """Median seconds of A-3PO's per-minibatch math (α and the interpolation) on ``n_tokens`` tokens."""
    from areal_a3po import interpolate, interpolation_weights

    g = torch.Generator().manual_seed(0)
    behave, theta = -torch.rand(n_tokens, generator=g) * 5, -torch.rand(n_tokens, generator=g) * 5
    versions = torch.randint(-1, 9, (n_tokens,), generator=g)
    mask = versions >= 0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        alpha = interpolation_weights(versions, 8, anchor="recompute", minibatch=1, n_minibatches=2, loss_mask=mask)
        interpolate(behave, theta, alpha)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def summarize(result: dict, n_tokens: int) -> dict:
    per_step = {name: rows[1:] if len(rows) > 1 else rows for name, rows in result["per_step"].items()}
    base = per_step["recompute"]
    out = {"phases": {}, "ratio_vs_recompute": {}}
    for name, rows in per_step.items():
        out["phases"][name] = {ph: _quartiles([r.get(ph, 0.0) for r in rows]) for ph in PHASES}
        out["ratio_vs_recompute"][name] = _quartiles([r["total"] / b["total"] for r, b in zip(rows, base)])
    out["limit_ratio"] = _quartiles([(b["total"] - b["recompute_logp"]) / b["total"] for b in base])
    step = out["phases"]["recompute"]["total"]["median"]
    cost = interpolation_cost(n_tokens)
    out["interpolation"] = dict(seconds=cost, share_of_recompute_step=cost * result["settings"]["minibatches"] / step)
    limit = out["limit_ratio"]["median"]
    out["gap_to_limit"] = {name: r["median"] / limit - 1 for name, r in out["ratio_vs_recompute"].items()}
    return out


def format_table(summary: dict) -> str:
    head = f"{'variant':<17}" + "".join(f"{p:>22}" for p in PHASES) + f"{'vs recompute':>16}{'vs limit':>10}"
    lines = [head, f"{'':<17}" + "".join(f"{'median [IQR] ms':>22}" for _ in PHASES)]
    for name, phases in summary["phases"].items():
        cells = "".join(
            f"{q['median'] * 1e3:>9.1f} [{q['p25'] * 1e3:5.1f},{q['p75'] * 1e3:5.1f}]" for q in phases.values()
        )
        ratio = summary["ratio_vs_recompute"][name]["median"]
        lines.append(f"{name:<17}{cells}{ratio:>15.3f}x{summary['gap_to_limit'][name]:>+10.1%}")
    lim = summary["limit_ratio"]
    lines.append(f"limit ratio (recompute step without its recompute phase): {lim['median']:.3f}x [{lim['p25']:.3f}, {lim['p75']:.3f}]")
    it = summary["interpolation"]
    lines.append(f"A-3PO interpolation alone: {it['seconds'] * 1e6:.0f} µs per minibatch, {it['share_of_recompute_step']:.2%} of the recompute step")
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["phases"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bottom = [0.0] * len(names)
    for phase in PHASES[:-1]:
        heights = [summary["phases"][n][phase]["median"] * 1e3 for n in names]
        ax.bar(names, heights, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.axhline(summary["phases"]["recompute"]["total"]["median"] * 1e3 * summary["limit_ratio"]["median"], ls="--", c="k", lw=1, label="limit")
    ax.set_ylabel("median ms per step")
    ax.set_title("Trainer step by phase (interleaved, same stale stream)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from areal_a3po.demo import run, run_args, stream_parser

    parser = stream_parser(__doc__, steps=30, seq_len=32)
    parser.add_argument("--plot", help="draw phase times per variant to this PNG")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    with tqdm(total=args.steps * len(VARIANTS), desc="steps x variants", unit="step") as bar:
        result = run(*run_args(args), variants=VARIANTS, audit=False, progress=bar.update)
    summary = summarize(result, n_tokens=args.seqs * args.seq_len // args.minibatches)
    print(format_table(summary))
    out = dict(settings=result["settings"], summary=summary, per_step=result["per_step"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(summary, args.plot)
        print(f"wrote {args.plot}")
    return out


if __name__ == "__main__":
    main()
