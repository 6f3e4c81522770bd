"""The interleaved run: several lanes (variant, actor, stale stream) trained step by step, one record each.

At every step each lane, in turn (the same order every step, or rotated with ``rotate=True`` so that
no lane always goes first), takes its stream's batch for that step and runs one trainer step on it
(``benchmarks.harness.actor.train_step``: AReaL's trainer-loop phases, each timed). Interleaving
makes the machine's noise hit every lane alike. Lanes may share an actor (one model in memory; each
lane's variant is applied to the shared config before its step) and a stream (its batch is drawn
once per step and every lane trains on it).

What a step leaves is a ``StepRecord``: the seconds of each phase, the recompute forwards run inside
the timed step (AReaL's ``recompute_logp`` phase, or the plugin's audit), whether the plugin audited
π_prox, the stats the step exported from AReaL's ``stats_tracker``, the batch's mean reward and
staleness and, at evaluation steps, the policy's evaluation.
"""

from __future__ import annotations

import statistics
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from benchmarks.harness.actor import attach_recomputed_prox, parameters, train_step
from benchmarks.harness.streams import StaleStream
from benchmarks.harness.variants import Variant

__all__ = ["AUDIT_PREFIX", "Lane", "PHASES", "StepRecord", "after_warmup", "by_lane", "median_after_warmup", "run_interleaved"]

T = TypeVar("T")

#: The trainer-step phases ``train_step`` times, as AReaL's ``timeperf/*`` names them.
PHASES = ("recompute_logp", "compute_advantage", "train_step")
AUDIT_PREFIX = "ppo_actor/update/a3po/audit/"


@dataclass
class Lane:
    """One line of an interleaved run.

    ``variant`` (optional) is applied to ``actor.config`` before each of the lane's steps (needed
    when lanes share an actor; a no-op on an actor built for the variant). ``snapshots``: when
    given, the actor's weights are appended after each step (index = version), for streams that
    score or sample with past versions.
    """

    name: str
    actor: Any
    stream: StaleStream
    variant: Variant | None = None
    snapshots: list[torch.Tensor] | None = None


@dataclass
class StepRecord:
    """What one lane's trainer step at version ``step`` left."""

    lane: str
    step: int
    timings: dict[str, float]  # seconds per phase run (PHASES; a phase not run is absent)
    recompute_forwards: int  # forward passes over the batch inside the timed step (recompute or audit)
    audited: bool  # the plugin measured its π_prox against a recomputed one (a3po/audit/* stats)
    stats: dict[str, float]  # what stats_tracker exported after the step
    reward: float  # the batch's mean reward
    staleness: float  # the batch's mean k − v over generated tokens
    eval_reward: float | None = None
    ground_truth: bool = False  # π_prox was recomputed outside the timed phases for the audit

    @property
    def total(self) -> float:
        """Seconds of the whole trainer step (the sum of its phases)."""
        return sum(self.timings.values())

    @property
    def grad_norm(self) -> float:
        """The update's gradient norm as AReaL logs it (0 when the loss has no gradient)."""
        return self.stats.get("ppo_actor/update/grad_norm", 0.0)

    def audit(self, key: str) -> float:
        """An ``a3po/audit/`` stat of this step (e.g. ``abs_error/avg``), 0 when not audited."""
        return self.stats.get(f"{AUDIT_PREFIX}{key}", 0.0) if self.audited else 0.0


@contextmanager
def counting_forwards(actor) -> Iterator[list[int]]:
    """Count ``actor``'s ``forward_batch`` calls (AReaL's no-grad forward over a batch) in the block."""
    calls: list[int] = []
    own = vars(actor).get("forward_batch")  # an instance attribute to put back, if any
    inner = actor.forward_batch

    def counted(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    actor.forward_batch = counted
    try:
        yield calls
    finally:
        if own is None:
            del actor.forward_batch  # the class's method again
        else:
            actor.forward_batch = own


def run_interleaved(
    lanes: Sequence[Lane],
    steps: int,
    *,
    rotate: bool = False,
    ground_truth: bool = False,
    evaluate: Callable[[Lane], float] | None = None,
    eval_at: Callable[[int], bool] = lambda version: False,
    progress: Callable[[], Any] | None = None,
) -> list[StepRecord]:
    """Train every lane ``steps`` steps, interleaved; one ``StepRecord`` per (step, lane), in run order.

    ``ground_truth``: before an a3po lane's step, recompute π_prox with AReaL's forward (untimed) so
    that the plugin's audit measures its approximation. ``evaluate(lane)``: called after a lane's
    step when ``eval_at(step + 1)`` (the new version), its value kept as ``eval_reward``.
    ``progress``: called once per record.
    """
    from areal.utils import stats_tracker

    records: list[StepRecord] = []
    stats_tracker.export_all()  # start from an empty tracker
    for step in range(steps):
        order = list(lanes)
        if rotate:
            order = order[step % len(order) :] + order[: step % len(order)]
        batches: dict[int, Any] = {}  # one batch per stream and step
        for lane in order:
            key = id(lane.stream)
            if key not in batches:
                batches[key] = lane.stream.batch(step)
            rollout = batches[key]
            actor = lane.actor
            if lane.variant is not None:
                lane.variant.apply(actor.config)
            trajs = rollout.trajectories()
            truth = ground_truth and actor.config.a3po_enabled
            if truth:  # not timed
                attach_recomputed_prox(actor, trajs)
            timings: dict[str, float] = {}
            with counting_forwards(actor) as forwards:
                train_step(actor, trajs, version=step, timings=timings)
            stats = stats_tracker.export_all()
            if lane.snapshots is not None:
                actor.set_version(step + 1)
                lane.snapshots.append(parameters(actor))
            record = StepRecord(
                lane=lane.name, step=step, timings=timings, recompute_forwards=len(forwards),
                audited=f"{AUDIT_PREFIX}tokens" in stats, stats=stats, reward=rollout.rewards.mean().item(),
                staleness=rollout.mean_staleness(step), ground_truth=truth,
            )
            if evaluate is not None and eval_at(step + 1):
                record.eval_reward = evaluate(lane)
            records.append(record)
            if progress is not None:
                progress()
    return records


def by_lane(records: Iterable[StepRecord]) -> dict[str, list[StepRecord]]:
    """The records per lane, each in step order, lanes in order of first appearance."""
    out: dict[str, list[StepRecord]] = {}
    for r in records:
        out.setdefault(r.lane, []).append(r)
    return out


def after_warmup(rows: Sequence[T]) -> Sequence[T]:
    """A lane's steps after its first, which carries one-off start-up cost (paid by whichever lane
    trains first); the one step when there is only one."""
    return rows[1:] if len(rows) > 1 else rows


def median_after_warmup(rows: Sequence[T], value: Callable[[T], float] = lambda r: r.total) -> float:
    """Median of ``value`` over ``after_warmup(rows)`` (default: a ``StepRecord``'s total seconds)."""
    return statistics.median(value(r) for r in after_warmup(rows))
