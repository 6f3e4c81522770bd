"""Trainer-step time per phase: AReaL's recompute, AReaL's loglinear and A-3PO (both anchors).

    python -m benchmarks.step_time [--steps 30] [--json out.json] [--plot out.png]
    python -m benchmarks.step_time --device cuda --model qwen2.5-1.5b-shape [--seq-len 1024 --seqs 16]
    python -m benchmarks.step_time --device cuda --model qwen2.5-1.5b-shape --dry-run   # plan only (CPU)

All variants train the same tiny Qwen2 (real AReaL FSDP actor, CPU), one actor each, on stale
batches scored by their own weight snapshots (the demo's run, ``benchmarks.in_process``), interleaved step
by step in one process (``benchmarks.harness.loop``) so machine noise hits all alike. Reported per phase: median and interquartile range over the steps after the first; the
per-step ratio variant/recompute (median); the **limit ratio** (recompute step − recompute phase) /
recompute step, the best any approximation can do; and the interpolation's own cost, timed alone on
a batch of the same size, as a share of the recompute step. CPU timings: ratios, not absolute times,
are what carry over.

``--model qwen2.5-1.5b-shape`` (or ``tiny-shape``) uses a random-initialised model of that shipped
architecture (``benchmarks/harness/shapes``; nothing downloaded) and **one shared actor** whose
``prox_logp_method`` is switched from variant to variant every step: one model and optimizer in
memory instead of four, every variant timed on the same weights and the same batch, in rotating
order. Its stale batches (``NoisyStream``) are the current policy's logprobs plus noise, tagged with versions up to ``--max-staleness``
back (per-version weight snapshots of a 1.5B model do not fit); timing does not depend on the
values. ``--device cuda`` runs in bfloat16 and synchronises the device at every phase boundary.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import tempfile
import time

import torch

from benchmarks.in_process import Settings, per_step, run, stream_parser
from benchmarks.harness import variants as registry
from benchmarks.harness.loop import PHASES as LOOP_PHASES, after_warmup
from benchmarks import output
from benchmarks.output import figure, table

PHASES = (*LOOP_PHASES, "total")


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
    per_step = {name: after_warmup(rows) for name, rows in result["per_step"].items()}
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
    rows = [[name, *(f"{q['median'] * 1e3:.1f} [{q['p25'] * 1e3:.1f}, {q['p75'] * 1e3:.1f}]" for q in phases.values()),
             f"{summary['ratio_vs_recompute'][name]['median']:.3f}x", f"{summary['gap_to_limit'][name]:+.1%}"]
            for name, phases in summary["phases"].items()]
    lines = [table(rows, ["variant", *(f"{p}\nmedian [IQR] ms" for p in PHASES), "vs recompute", "vs limit"])]
    lim = summary["limit_ratio"]
    lines.append(f"limit ratio (recompute step without its recompute phase): {lim['median']:.3f}x [{lim['p25']:.3f}, {lim['p75']:.3f}]")
    it = summary["interpolation"]
    lines.append(f"A-3PO interpolation alone: {it['seconds'] * 1e6:.0f} µs per minibatch, {it['share_of_recompute_step']:.2%} of the recompute step")
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    names = list(summary["phases"])
    with figure(path, figsize=(7, 3.5)) as (_, ax):
        bottom = [0.0] * len(names)
        for phase in PHASES[:-1]:
            heights = [summary["phases"][n][phase]["median"] * 1e3 for n in names]
            ax.bar(names, heights, bottom=bottom, label=phase)
            bottom = [b + h for b, h in zip(bottom, heights)]
        limit = summary["phases"]["recompute"]["total"]["median"] * 1e3 * summary["limit_ratio"]["median"]
        ax.axhline(limit, ls="--", c="k", lw=1, label="limit")
        ax.set_ylabel("median ms per step")
        ax.set_title("Trainer step by phase (interleaved, same stale stream)")
        ax.legend(fontsize=8)


MODELS = {"toy": None, "qwen2.5-1.5b-shape": "qwen2.5-1.5b", "tiny-shape": "tiny", "cpu-wide-shape": "cpu-wide"}


def shared_run(shape: str, settings: Settings, *, dtype: str = "float32", progress=None) -> dict:
    """The variants on one actor (``prox_logp_method`` switched per step) and a model of ``shape``."""
    with tempfile.TemporaryDirectory(prefix="a3po-step-time-") as workdir:
        records = _train_shared(workdir, shape, settings, dtype, progress)
    out = dataclasses.asdict(settings)
    del out["audit_interval"]
    return dict(settings=dict(out, model=shape, dtype=dtype, shared_actor=True), per_step=per_step(records))


def _train_shared(workdir, shape, s: Settings, dtype, progress):
    from benchmarks.harness.actor import make_actor
    from benchmarks.harness.loop import Lane, run_interleaved
    from benchmarks.harness.models import build_model
    from benchmarks.harness.streams import NoisyStream

    model = build_model(f"{workdir}/model", shape, seed=s.seed)
    actor = make_actor(model, prox_logp_method="a3po", ppo_n_minibatches=s.minibatches, max_tokens_per_mb=s.seq_len,
                       lr=1e-6, dtype=dtype, pad_to_maximum=True)
    # One batch per step for every variant: the current policy's logprobs plus noise.
    stream = NoisyStream(actor, n_seqs=s.n_seqs, seq_len=s.seq_len, prompt_len=s.prompt_len,
                         max_staleness=s.max_staleness, seed=s.seed, noise=0.1)
    lanes = [Lane(name, actor, stream, registry.get(name)) for name in registry.COMPARED]
    return run_interleaved(lanes, s.steps, rotate=True, progress=progress)  # rotated: no variant always goes first


def plan(args) -> str:
    """What ``main`` would run, without building the model (``--dry-run``)."""
    shape = MODELS[args.model]
    lines = [f"device={args.device} model={args.model} steps={args.steps} batch={args.seqs}x{args.seq_len} tokens "
             f"ppo_n_minibatches={args.minibatches} max_staleness={args.max_staleness} variants={list(registry.COMPARED)}"]
    if shape is None:
        lines.append("toy model: one actor per variant, each scored by its own weight snapshots (benchmarks.in_process)")
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from benchmarks.harness.models import model_shape

        spec = {k: v for k, v in model_shape(shape).items() if k != "torch_dtype"}
        with torch.device("meta"):
            n = sum(p.numel() for p in Qwen2ForCausalLM(Qwen2Config(**spec)).parameters())
        lines.append(f"{shape}: {spec['num_hidden_layers']} layers, hidden {spec['hidden_size']}, vocab "
                     f"{spec['vocab_size']}, {n / 1e9:.2f}B parameters, random init, dtype {_dtype(args)}; "
                     "one shared actor, variants switched per step")
    return "\n".join(lines)


def _dtype(args) -> str:
    return "bfloat16" if args.device == "cuda" else "float32"


def main(argv: list[str] | None = None) -> dict:
    parser = stream_parser(__doc__, steps=30, seq_len=32)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=list(MODELS), default="toy",
                        help="toy: the demo's tiny Qwen2; *-shape: a random model of a shipped architecture")
    output.output_options(parser, plot="draw phase times per variant to this PNG",
                          dry_run="print what would run and exit")
    args = parser.parse_args(argv)
    if args.dry_run:
        print(plan(args))
        return {"plan": plan(args)}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.step_time --device cuda: no CUDA device is visible here; "
                         "run on a GPU machine, or use --device cpu (or --dry-run to see the plan).")
    if args.device == "cpu" and args.model == "qwen2.5-1.5b-shape":
        print("note: a 1.5B model on CPU takes minutes per step; --device cuda is what this shape is for")

    from tqdm import tqdm

    settings = Settings.from_args(args)
    with tqdm(total=args.steps * len(registry.COMPARED), desc="steps x variants", unit="step") as bar:
        if MODELS[args.model] is None:
            result = run(settings, variants=registry.COMPARED, audit=False, progress=bar.update)
        else:
            result = shared_run(MODELS[args.model], settings, dtype=_dtype(args), progress=bar.update)
    summary = summarize(result, n_tokens=args.seqs * args.seq_len // args.minibatches)
    print(format_table(summary))
    out = dict(settings=result["settings"], summary=summary, per_step=result["per_step"])
    output.save(out, args, functools.partial(plot, summary))
    return out


if __name__ == "__main__":
    main()
