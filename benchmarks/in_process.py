"""In-process demo (no server): the tiny model trained a few steps with AReaL's recompute and with A-3PO, side by side.

    python -m benchmarks.in_process [--steps 12] [--max-staleness 4] [--minibatches 2] [--json out.json]
                              [--audit-interval N]

Every variant consumes the same kind of stream of stale batches (``ScoredStream``): the batch
consumed at step s was scored by *that variant's own* policy at version s − d (weight snapshots),
with d drawn per sequence up to ``--max-staleness`` and, in half the sequences, a version switch
mid-response, recorded per token as AReaL's inference engine records it. The variants are
interleaved step by step in one process (``benchmarks.harness.loop``). A-3PO's π_prox error is
measured against the recomputed ground truth, which the demo computes for the A-3PO variants
outside their timed phases (``a3po/audit/*`` stats); ``--audit-interval N`` uses the plugin's own
audit instead (every N-th version, inside the timed update, as in production).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from benchmarks.harness import variants as registry
from benchmarks.harness.loop import PHASES, StepRecord, after_warmup, by_lane, median_after_warmup
from benchmarks import output
from benchmarks.output import table

AUDIT_KEYS = {  # demo name -> stats_tracker key (under ppo_actor/update/a3po/audit/)
    "abs_error": "abs_error/avg",
    "abs_error_max": "max_abs_error",
    "behave_weight_error": "behave_imp_weight_abs_error/avg",
    "ratio_error": "importance_weight_abs_error/avg",
    "kl": "kl/avg",
    "clip_disagreement": "clip_disagreement/avg",
    "areal_loglinear_abs_error": "areal_loglinear/abs_error/avg",
}


@dataclass(frozen=True)
class Settings:
    """The run: ``steps`` trainer steps per variant on batches of ``n_seqs`` × ``seq_len`` tokens (the
    first third prompt), staleness ≤ ``max_staleness``, ``ppo_n_minibatches`` = ``minibatches``;
    ``audit_interval`` > 0: the plugin's own audit every N-th version."""

    steps: int = 12
    max_staleness: int = 4
    minibatches: int = 2
    n_seqs: int = 8
    seq_len: int = 24
    seed: int = 0
    audit_interval: int = 0

    @property
    def prompt_len(self) -> int:
        return self.seq_len // 3

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Settings":
        """From ``stream_parser``'s namespace."""
        return cls(steps=args.steps, max_staleness=args.max_staleness, minibatches=args.minibatches, n_seqs=args.seqs,
                   seq_len=args.seq_len, seed=args.seed, audit_interval=args.audit_interval)


def run(
    settings: Settings = Settings(),
    *,
    variants: Sequence[str] = registry.DEMO,
    audit: bool = True,
    progress: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Train each variant ``settings.steps`` steps on its own stale stream, interleaved; return all timings.

    ``audit``: recompute the ground truth π_prox (untimed) for the a3po variants to measure their
    error (ignored with ``settings.audit_interval`` > 0: the plugin's own audit does). ``progress``:
    called once per trained (step, variant).
    """
    with tempfile.TemporaryDirectory(prefix="a3po-demo-") as workdir:
        records = _train(workdir, settings, [registry.get(name) for name in variants], audit, progress)
    return dict(settings=dataclasses.asdict(settings), summary=summarize(records), per_step=per_step(records))


def _train(workdir: str, s: Settings, variants: list[registry.Variant], audit: bool, progress) -> list[StepRecord]:
    from benchmarks.harness.actor import make_actor, parameters
    from benchmarks.harness.loop import Lane, run_interleaved
    from benchmarks.harness.models import build_model
    from benchmarks.harness.streams import ScoredStream

    model = build_model(f"{workdir}/model", "toy", seed=s.seed)
    common = dict(ppo_n_minibatches=s.minibatches, max_tokens_per_mb=s.seq_len, lr=2e-3)

    def build(variant):
        options = variant.actor_options()
        if s.audit_interval and variant.a3po:
            options["a3po_options"] = {"audit_interval": s.audit_interval}
        return make_actor(model, **options, **common)

    actors = [build(v) for v in variants]
    scorer = make_actor(model, **common)  # scores each batch with the snapshot of every token's version
    lanes = []
    for variant, actor in zip(variants, actors):
        snapshots = [parameters(actor)]
        stream = ScoredStream(scorer, snapshots, n_seqs=s.n_seqs, seq_len=s.seq_len, prompt_len=s.prompt_len,
                              max_staleness=variant.staleness(s.max_staleness), seed=s.seed)
        lanes.append(Lane(variant.name, actor, stream, variant, snapshots))
    return run_interleaved(lanes, s.steps, ground_truth=audit and not s.audit_interval, progress=progress)


def per_step(records: Iterable[StepRecord]) -> dict[str, list[dict[str, float]]]:
    """Per variant, one row per step: seconds per phase run and in total, the recompute forwards in the
    timed step, the update's gradient norm, whether it was audited and, if so, the audit's errors
    (``AUDIT_KEYS``)."""
    out: dict[str, list[dict[str, float]]] = {}
    for name, rows in by_lane(records).items():
        out[name] = []
        for r in rows:
            row = dict(r.timings, total=r.total, audited=float(r.audited), recompute_forwards=r.recompute_forwards,
                       grad_norm=r.grad_norm)
            if r.audited:
                row.update({key: r.audit(stat) for key, stat in AUDIT_KEYS.items()})
            out[name].append(row)
    return out


def summarize(records: Iterable[StepRecord]) -> dict[str, dict[str, float]]:
    """Per variant, over the steps after the first: median seconds per phase and in total; the audit's
    errors averaged over audited steps (``abs_error_max``: their maximum); with the plugin's own audit,
    the median total of audited and of plain steps. ``recompute_forwards``: over all steps."""
    summary = {}
    for name, rows in by_lane(records).items():
        s = {key: median_after_warmup(rows, lambda r, key=key: r.timings.get(key, 0.0)) for key in PHASES}
        s["total"] = median_after_warmup(rows)
        kept = after_warmup(rows)
        audited = [r for r in kept if r.audited]
        plain = [r for r in kept if not r.audited]
        for key, stat in AUDIT_KEYS.items():
            values = [r.audit(stat) for r in audited]
            reduce = max if key == "abs_error_max" else statistics.fmean
            s[key] = reduce(values) if values else 0.0
        s["audited_steps"] = len(audited)
        if audited and plain and not any(r.ground_truth for r in audited):
            s["total_audited"] = statistics.median(r.total for r in audited)
            s["total_plain"] = statistics.median(r.total for r in plain)
        s["recompute_forwards"] = sum(r.recompute_forwards for r in rows)
        summary[name] = s
    return summary


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}ms"


def format_table(result: dict[str, Any]) -> str:
    summary = result["summary"]
    base = summary.get("recompute", {}).get("total")
    rows = [[name, _ms(s["recompute_logp"]), _ms(s["compute_advantage"]), _ms(s["train_step"]), _ms(s["total"]),
             f"{s['total'] / base:.2f}x" if base else "-", f"{s['abs_error']:.2e}", f"{s['abs_error_max']:.2e}",
             f"{s['behave_weight_error']:.2e}"]
            for name, s in summary.items()]
    return table(rows, ["variant", "recompute_logp", "advantages", "update", "total", "vs recompute", "|Δlog π_prox|",
                        "max", "|Δ weight|"])


def format_savings(result: dict[str, Any]) -> str:
    """Per variant other than recompute: its recompute forwards and the time it saves per step."""
    s, steps = result["summary"], result["settings"]["steps"]
    if "recompute" not in s:
        return ""
    saved, base = s["recompute"]["recompute_logp"], s["recompute"]["total"]
    lines = []
    for name, v in s.items():
        if name == "recompute":
            continue
        n = v["recompute_forwards"]
        what = "recompute forward skipped" if n == 0 else f"recompute forward on {n} of {steps} steps (the audit)"
        lines.append(f"{name}: {what}, {saved * 1e3:.1f} ms/step saved ({saved / base:.0%} of the recompute step); "
                     f"step time {v['total'] / base:.2f}x recompute")
    return "\n".join(lines)


def format_audit_table(result: dict[str, Any]) -> str:
    """The plugin's own audit (``--audit-interval``): errors on audited steps and their extra time."""
    n = result["settings"]["audit_interval"]
    rows = []
    for name, s in result["summary"].items():
        if "total_audited" in s:
            keys = ("abs_error", "abs_error_max", "behave_weight_error", "ratio_error", "kl")
            errors = [f"{s[key]:.2e}" for key in keys]
            rows.append([name, s["audited_steps"], *errors, f"{s['clip_disagreement']:.1%}",
                         f"{s['areal_loglinear_abs_error']:.2e}", _ms(s["total_plain"]), _ms(s["total_audited"]),
                         f"{s['total_audited'] / s['total_plain'] - 1:+.0%}"])
    headers = ["variant", "audited", "|Δlog π|", "max", "|Δ weight|", "|Δ ratio|", "KL", "clip≠", "AReaL loglin",
               "plain step", "audited step", "extra"]
    return table(rows, headers) + f"\n(audit every {n} steps: amortised extra cost = extra / {n})"


def stream_parser(doc: str, *, steps: int, seq_len: int) -> argparse.ArgumentParser:
    """The command-line options of ``Settings`` (shared by the demo and ``benchmarks.step_time``)."""
    parser = output.parser(doc)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--max-staleness", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=2, help="actor.ppo_n_minibatches")
    parser.add_argument("--seqs", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=seq_len)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--audit-interval", type=int, default=0, metavar="N",
        help="use the plugin's own audit (actor.a3po.audit_interval=N) instead of the untimed ground truth",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = output.output_options(stream_parser(__doc__, steps=12, seq_len=24)).parse_args(argv)
    settings = Settings.from_args(args)
    result = run(settings)
    print()
    print(f"A-3PO CPU demo: tiny Qwen2, {args.steps} steps, staleness ≤ {args.max_staleness}, "
          f"ppo_n_minibatches={args.minibatches}, medians after step 0 (π_prox errors vs recomputed ground truth)")
    print(format_table(result))
    savings = format_savings(result)
    if savings:
        print(savings)
    if args.audit_interval:
        print()
        print(f"Audit (actor.a3po.audit_interval={args.audit_interval}): errors on audited steps vs recomputed π_prox, step times")
        print(format_audit_table(result))
    output.save(result, args)
    return result


if __name__ == "__main__":
    main()
