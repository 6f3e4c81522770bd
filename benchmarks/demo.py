"""CPU demo: train the tiny model a few steps with AReaL's recompute and with A-3PO, side by side.

    python -m benchmarks.demo [--steps 12] [--max-staleness 4] [--minibatches 2] [--json out.json]
                              [--audit-interval N]

Every variant consumes the same stream of stale batches: the batch consumed at step s was scored
by *that variant's own* policy at version s − d (weight snapshots), with d drawn per sequence up
to ``--max-staleness`` and, in half the sequences, a version switch mid-response, recorded per
token as AReaL's inference engine records it. The variants are interleaved step by step in one
process. A-3PO's π_prox error is measured against the recomputed ground truth, which the demo
computes for the A-3PO variants outside their timed phases (``a3po/audit/*`` stats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import contextmanager
from typing import Any

import torch

VARIANTS = {
    "recompute": dict(prox_logp_method="recompute"),
    "areal-loglinear": dict(prox_logp_method="loglinear"),  # AReaL's built-in approximation
    "a3po-paper": dict(prox_logp_method="a3po", anchor="paper"),
    "a3po-recompute": dict(prox_logp_method="a3po", anchor="recompute"),
}


def _sync() -> None:
    # GPU kernels run asynchronously: a phase has ended only when the device is idle.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def _timed(timings: dict[str, float] | None, key: str):
    _sync()
    start = time.perf_counter()
    yield
    _sync()
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def attach_recomputed_prox(actor, trajs: list[dict[str, Any]]) -> None:
    """AReaL's recompute forward: store π_prox (label-aligned) in each trajectory as ``prox_logp``."""
    for traj, logp in zip(trajs, actor.compute_logp(trajs)):
        traj["prox_logp"] = logp


def train_step(actor, trajs: list[dict[str, Any]], *, version: int, timings: dict[str, float] | None = None) -> None:
    """One trainer step as ``PPOTrainer.train`` runs it (areal 1.0.4, rl_trainer.py ~680-730):
    recompute π_prox only if ``config.actor.should_compute_prox_logp()``, then advantages, update."""
    actor.set_version(version)
    if actor.config.should_compute_prox_logp():
        with _timed(timings, "recompute_logp"):
            attach_recomputed_prox(actor, trajs)
    with _timed(timings, "compute_advantage"):
        adv = actor.compute_advantages(trajs)
    with _timed(timings, "train_step"):
        actor.ppo_update(adv)
        actor.step_lr_scheduler()


def _stale_rollout(scorer, snapshots: list[torch.Tensor], step: int, *, seed: int, n_seqs: int, seq_len: int, prompt_len: int, max_staleness: int):
    from benchmarks.harness.streams import Rollout, random_tokens, token_logprobs
    from benchmarks.harness.actor import load_parameters

    g = torch.Generator().manual_seed(seed * 1000 + step)
    ids, loss_mask = random_tokens(n_seqs, seq_len, prompt_len, seed=seed * 1000 + step)
    versions = torch.full(ids.shape, -1)
    for i in range(n_seqs):
        v = step - int(torch.randint(0, min(max_staleness, step) + 1, (1,), generator=g))
        versions[i, prompt_len:] = v
        if i % 2 == 1 and v < step:  # the engine picked up new weights mid-response
            versions[i, (prompt_len + seq_len) // 2 :] = v + 1
    behave = torch.zeros(ids.shape)
    for v in versions.unique().tolist():
        if v < 0:
            continue
        load_parameters(scorer, snapshots[v])
        logp = token_logprobs(scorer, ids)
        behave = torch.where(versions == v, logp, behave)
    rewards = (torch.rand(n_seqs, generator=g) > 0.5).float()
    return Rollout(ids, loss_mask, versions, behave * loss_mask, rewards)


DEMO_VARIANTS = ("recompute", "a3po-paper", "a3po-recompute")


AUDIT_KEYS = {  # demo name -> stats_tracker key (under ppo_actor/update/a3po/audit/)
    "abs_error": "abs_error/avg",
    "abs_error_max": "max_abs_error",
    "behave_weight_error": "behave_imp_weight_abs_error/avg",
    "ratio_error": "importance_weight_abs_error/avg",
    "kl": "kl/avg",
    "clip_disagreement": "clip_disagreement/avg",
    "areal_loglinear_abs_error": "areal_loglinear/abs_error/avg",
}


def run(
    steps: int = 12,
    max_staleness: int = 4,
    minibatches: int = 2,
    n_seqs: int = 8,
    seq_len: int = 24,
    seed: int = 0,
    variants=DEMO_VARIANTS,
    audit: bool = True,
    progress=None,
    audit_interval: int = 0,
) -> dict[str, Any]:
    """Train each variant ``steps`` steps on its own stale stream, interleaved; return all timings.

    ``audit``: recompute the ground truth π_prox (untimed) for the a3po variants to measure their
    error. ``audit_interval`` > 0 instead turns on the plugin's own audit
    (``actor.a3po.audit_interval``): the a3po actors recompute π_prox every N-th step inside their
    timed update, as in production. ``progress``: called once per trained (step, variant).
    """
    with tempfile.TemporaryDirectory(prefix="a3po-demo-") as workdir:
        return _run(workdir, steps, max_staleness, minibatches, n_seqs, seq_len, seed, list(variants), audit, progress, audit_interval)


def _run(workdir, steps, max_staleness, minibatches, n_seqs, seq_len, seed, variants, audit, progress, audit_interval):
    from areal.utils import stats_tracker

    from benchmarks.harness.models import build_model

    from benchmarks.harness.actor import make_actor, parameters

    model = build_model(f"{workdir}/model", "toy", seed=seed)
    common = dict(ppo_n_minibatches=minibatches, max_tokens_per_mb=seq_len, lr=2e-3)

    def build(name):
        options = dict(VARIANTS[name])
        if audit_interval and options["prox_logp_method"] == "a3po":
            options["a3po_options"] = {"audit_interval": audit_interval}
        return make_actor(model, **options, **common)

    actors = {name: build(name) for name in variants}
    scorer = make_actor(model, **common)
    snapshots = {name: [parameters(actor)] for name, actor in actors.items()}
    per_step: dict[str, list[dict[str, float]]] = {name: [] for name in variants}

    stats_tracker.export_all()
    for step in range(steps):
        for name in variants:  # interleaved: machine noise hits all variants alike
            actor = actors[name]
            rollout = _stale_rollout(scorer, snapshots[name], step, seed=seed, n_seqs=n_seqs, seq_len=seq_len, prompt_len=seq_len // 3, max_staleness=max_staleness)
            trajs = rollout.trajectories()
            if audit and not audit_interval and actor.config.a3po_enabled:  # ground truth, not timed
                attach_recomputed_prox(actor, trajs)
            timings: dict[str, float] = {}
            train_step(actor, trajs, version=step, timings=timings)
            stats = stats_tracker.export_all()
            timings["total"] = sum(timings.values())
            audited = "ppo_actor/update/a3po/audit/tokens" in stats
            timings["audited"] = float(audited)
            for key, stat in AUDIT_KEYS.items():
                if audited:
                    timings[key] = stats.get(f"ppo_actor/update/a3po/audit/{stat}", 0.0)
            per_step[name].append(timings)
            actor.set_version(step + 1)
            snapshots[name].append(parameters(actor))
            if progress is not None:
                progress()

    skip = 1 if steps > 1 else 0  # the first step carries one-off start-up cost
    summary = {}
    for name, rows in per_step.items():
        rows = rows[skip:]
        summary[name] = {
            key: statistics.median(r.get(key, 0.0) for r in rows)
            for key in ("recompute_logp", "compute_advantage", "train_step", "total")
        }
        audited = [r for r in rows if r["audited"]]
        plain = [r for r in rows if not r["audited"]]
        for key in AUDIT_KEYS:
            values = [r[key] for r in audited]
            reduce = max if key == "abs_error_max" else statistics.fmean
            summary[name][key] = reduce(values) if values else 0.0
        summary[name]["audited_steps"] = len(audited)
        if audit_interval and audited and plain:
            summary[name]["total_audited"] = statistics.median(r["total"] for r in audited)
            summary[name]["total_plain"] = statistics.median(r["total"] for r in plain)
    return dict(
        settings=dict(steps=steps, max_staleness=max_staleness, minibatches=minibatches, n_seqs=n_seqs, seq_len=seq_len, seed=seed, audit_interval=audit_interval),
        summary=summary,
        per_step=per_step,
    )


def format_table(result: dict[str, Any]) -> str:
    summary = result["summary"]
    base = summary.get("recompute", {}).get("total")
    lines = [
        f"{'variant':<16}{'recompute_logp':>15}{'advantages':>12}{'update':>10}{'total':>10}{'vs recompute':>14}"
        f"{'|Δlog π_prox|':>15}{'max':>9}{'|Δ weight|':>12}",
    ]
    for name, s in summary.items():
        ratio = f"{s['total'] / base:.2f}x" if base else "-"
        lines.append(
            f"{name:<16}{s['recompute_logp'] * 1e3:>13.1f}ms{s['compute_advantage'] * 1e3:>10.1f}ms"
            f"{s['train_step'] * 1e3:>8.1f}ms{s['total'] * 1e3:>8.1f}ms{ratio:>14}"
            f"{s['abs_error']:>15.2e}{s['abs_error_max']:>9.2e}{s['behave_weight_error']:>12.2e}"
        )
    return "\n".join(lines)


def format_audit_table(result: dict[str, Any]) -> str:
    """The plugin's own audit (``--audit-interval``): errors on audited steps and their extra time."""
    n = result["settings"]["audit_interval"]
    lines = [
        f"{'variant':<16}{'audited':>8}{'|Δlog π|':>10}{'max':>9}{'|Δ weight|':>11}{'|Δ ratio|':>10}{'KL':>10}"
        f"{'clip≠':>8}{'AReaL loglin':>14}{'plain step':>12}{'audited step':>14}{'extra':>8}",
    ]
    for name, s in result["summary"].items():
        if "total_audited" not in s:
            continue
        extra = s["total_audited"] / s["total_plain"] - 1
        lines.append(
            f"{name:<16}{s['audited_steps']:>8}{s['abs_error']:>10.2e}{s['abs_error_max']:>9.2e}"
            f"{s['behave_weight_error']:>11.2e}{s['ratio_error']:>10.2e}{s['kl']:>10.2e}{s['clip_disagreement']:>8.1%}"
            f"{s['areal_loglinear_abs_error']:>14.2e}{s['total_plain'] * 1e3:>10.1f}ms{s['total_audited'] * 1e3:>12.1f}ms{extra:>+8.0%}"
        )
    lines.append(f"(audit every {n} steps: amortised extra cost = extra / {n})")
    return "\n".join(lines)


def stream_parser(doc: str, *, steps: int, seq_len: int) -> argparse.ArgumentParser:
    """The command-line options of ``run`` (shared by the demo and the benchmarks)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--max-staleness", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=2, help="actor.ppo_n_minibatches")
    parser.add_argument("--seqs", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=seq_len)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write all figures to this file")
    parser.add_argument(
        "--audit-interval", type=int, default=0, metavar="N",
        help="use the plugin's own audit (actor.a3po.audit_interval=N) instead of the untimed ground truth",
    )
    return parser


def run_args(args: argparse.Namespace) -> tuple:
    """``run``'s positional arguments from ``stream_parser``'s namespace."""
    return args.steps, args.max_staleness, args.minibatches, args.seqs, args.seq_len, args.seed


def main(argv: list[str] | None = None) -> None:
    args = stream_parser(__doc__, steps=12, seq_len=24).parse_args(argv)
    result = run(*run_args(args), audit_interval=args.audit_interval)
    print()
    print(f"A-3PO CPU demo: tiny Qwen2, {args.steps} steps, staleness ≤ {args.max_staleness}, "
          f"ppo_n_minibatches={args.minibatches}, medians after step 0 (π_prox errors vs recomputed ground truth)")
    print(format_table(result))
    s = result["summary"]
    if "recompute" in s:
        saved = s["recompute"]["recompute_logp"]
        for name in s:
            if name != "recompute":
                print(f"{name}: recompute forward skipped, {saved * 1e3:.1f} ms/step saved "
                      f"({saved / s['recompute']['total']:.0%} of the recompute step); step time "
                      f"{s[name]['total'] / s['recompute']['total']:.2f}x recompute")
    if args.audit_interval:
        print()
        print(f"Audit (actor.a3po.audit_interval={args.audit_interval}): errors on audited steps vs recomputed π_prox, step times")
        print(format_audit_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
