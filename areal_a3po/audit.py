"""How far an approximated π_prox is from the recomputed one: per-token errors and their totals.

Pure torch (no AReaL import). With ``â_t = log π̂_prox(a_t)`` (approximation), ``p_t = log π_prox(a_t)``
(AReaL's recompute forward: the truth), ``b_t = log π_behave(a_t)`` and ``θ_t = log π_θ(a_t)``:

- ``abs_error``                    |â − p|
- ``behave_imp_weight_abs_error``  |e^(â−b) − e^(p−b)|          (the behaviour weight π_prox/π_behave)
- ``importance_weight_abs_error``  |e^(θ−â) − e^(θ−p)|          (the PPO ratio r = π_θ/π_prox)
- ``kl``                           ρ − 1 − log ρ with ρ = e^(â−p): the k3 estimate of KL(π_prox ‖ π̂_prox)
                                   on the sampled token (≥ 0, 0 iff â = p)
- ``clip_disagreement``            1 where PPO's clip decision differs: the clipped branch is taken
                                   when Â > 0 and r > 1 + ε_high, or Â < 0 and r < 1 − ε
- ``max_abs_error``                max over tokens of |â − p| (a total, not a per-token value)

``audit_report`` measures one micro-batch (``AuditInputs``: the active approximation, the methods
it is compared with, the truth) into an ``AuditReport``: every method's per-token errors, the
tokens of each staleness bucket (a fixed set: the same keys on every rank) and the behaviour gap |b − p|. ``log_audit_report`` is the one
place that writes a report to AReaL's ``stats_tracker`` (imported there, so this module stays
importable without AReaL). ``AuditTotals`` sums the active method's errors over a step for the
fallback's decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from areal_a3po.ranks import device_of, distributed

__all__ = [
    "AUDIT_METRICS",
    "AuditInputs",
    "AuditReport",
    "AuditTotals",
    "audit_report",
    "clip_active",
    "log_audit_report",
    "staleness_buckets",
    "token_errors",
]

#: Per-token errors, then the one max; every name is a valid ``fallback.metric``.
TOKEN_METRICS = (
    "abs_error",
    "behave_imp_weight_abs_error",
    "importance_weight_abs_error",
    "kl",
    "clip_disagreement",
)
AUDIT_METRICS = TOKEN_METRICS + ("max_abs_error",)


def clip_active(log_ratio: torch.Tensor, advantages: torch.Tensor, eps_clip: float, eps_clip_higher: float | None = None) -> torch.Tensor:
    """Whether PPO's min() takes the clipped term: (Â > 0 and r > 1 + ε_high) or (Â < 0 and r < 1 − ε).

    ``eps_clip_higher`` None means ε_high = ε (AReaL's convention). Returns bool, shape of ``log_ratio``.
    """
    high = eps_clip if eps_clip_higher is None else eps_clip_higher
    ratio = torch.exp(log_ratio)
    return ((advantages > 0) & (ratio > 1.0 + high)) | ((advantages < 0) & (ratio < 1.0 - eps_clip))


def token_errors(
    approx_logp: torch.Tensor,
    true_logp: torch.Tensor,
    behave_logp: torch.Tensor,
    theta_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_clip: float,
    eps_clip_higher: float | None = None,
) -> dict[str, torch.Tensor]:
    """Every per-token error in ``TOKEN_METRICS`` (float32, the inputs' shape; mask them yourself)."""
    a, p, b, t = (x.detach().float() for x in (approx_logp, true_logp, behave_logp, theta_logp))
    err = a - p
    return {
        "abs_error": err.abs(),
        "behave_imp_weight_abs_error": (torch.exp(a - b) - torch.exp(p - b)).abs(),
        "importance_weight_abs_error": (torch.exp(t - a) - torch.exp(t - p)).abs(),
        "kl": torch.expm1(err) - err,
        "clip_disagreement": (
            clip_active(t - a, advantages, eps_clip, eps_clip_higher)
            != clip_active(t - p, advantages, eps_clip, eps_clip_higher)
        ).float(),
    }


@dataclass(frozen=True)
class AuditInputs:
    """One micro-batch as the audit sees it: every tensor label-aligned and of one shape.

    ``approx`` is the active approximation's log π̂_prox, ``others`` the log π̂_prox of each method
    it is compared with, by name (``anchor_<name>``, ``areal_loglinear``), ``truth`` AReaL's
    recomputed log π_prox, ``tokens`` (bool) the generated tokens with ``loss_mask`` = 1,
    ``staleness`` d = k − v per token and ``staleness_limit`` S the last staleness with a bucket of
    its own (``staleness_buckets``).
    """

    approx: torch.Tensor
    others: Mapping[str, torch.Tensor]
    truth: torch.Tensor
    behave: torch.Tensor
    theta: torch.Tensor
    advantages: torch.Tensor
    tokens: torch.Tensor
    staleness: torch.Tensor
    minibatch: int
    eps_clip: float
    eps_clip_higher: float | None = None
    staleness_limit: int = 8


@dataclass(frozen=True)
class AuditReport:
    """The audit of one micro-batch (minibatch j of the update). Per-token tensors are float32, 0 off ``tokens``.

    ``active``/``others[name]``: ``TOKEN_METRICS`` → per-token error of the active approximation /
    of each compared method; ``staleness``: bucket name → its tokens (``staleness_buckets``: every
    bucket, also the empty ones); ``behave_gap``:
    |log π_behave − log π_prox| (for d = 0 in minibatch 0 the inference/trainer mismatch).
    """

    minibatch: int
    tokens: torch.Tensor
    active: dict[str, torch.Tensor]
    others: dict[str, dict[str, torch.Tensor]]
    staleness: dict[str, torch.Tensor]
    behave_gap: torch.Tensor


def staleness_buckets(staleness: torch.Tensor, tokens: torch.Tensor, limit: int) -> dict[str, torch.Tensor]:
    """The tokens of each staleness bucket: ``staleness_0`` … ``staleness_<S>`` (d = 0 … S) and
    ``staleness_gt_<S>`` (d > S), S = ``limit``. Every bucket, also an empty one, so that every rank
    logs the same keys whatever its shard holds: AReaL's ``stats_tracker.export_all`` reduces each
    key over the data-parallel group, and a key that one rank lacks pairs the ranks' collectives
    wrongly (gloo aborts, NCCL hangs or returns wrong numbers)."""
    buckets = {f"staleness_{d}": tokens & (staleness == d) for d in range(limit + 1)}
    buckets[f"staleness_gt_{limit}"] = tokens & (staleness > limit)
    return buckets


def audit_report(inputs: AuditInputs) -> AuditReport:
    """Every method's errors against the truth on ``inputs.tokens`` (no host sync)."""
    tokens = inputs.tokens.bool()
    zero = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)

    def errors(approx: torch.Tensor) -> dict[str, torch.Tensor]:
        e = token_errors(
            approx, inputs.truth, inputs.behave, inputs.theta, inputs.advantages,
            eps_clip=inputs.eps_clip, eps_clip_higher=inputs.eps_clip_higher,
        )
        return {k: torch.where(tokens, v, zero) for k, v in e.items()}

    d = inputs.staleness
    return AuditReport(
        minibatch=inputs.minibatch,
        tokens=tokens,
        active=errors(inputs.approx),
        others={name: errors(x) for name, x in inputs.others.items()},
        staleness=staleness_buckets(d, tokens, inputs.staleness_limit),
        behave_gap=torch.where(tokens, (inputs.behave.float() - inputs.truth.float()).abs(), zero),
    )


def log_audit_report(report: AuditReport) -> None:
    """Write ``report`` to AReaL's ``stats_tracker`` under the current scope (the actor's ``a3po``).

    Keys: ``audit/<metric>`` and ``audit/max_abs_error`` (active method), ``audit/<name>/<metric>``
    (each compared method), ``audit/minibatch_<j>/[<name>/]abs_error``,
    ``audit/<bucket>/[<name>/]abs_error`` and ``audit/<bucket>/behave_gap`` for every staleness
    bucket, each with its token denominator (``audit/tokens``, ``audit/minibatch_<j>/tokens``,
    ``audit/<bucket>/tokens``). The key set depends on the configuration only (every rank runs
    every minibatch and logs every bucket); AReaL's export leaves out an average whose tokens are 0
    on all ranks. Audit stats have denominators of their own: they are recorded on audited steps
    only, and a stats_tracker denominator must have one entry per entry of each stat that uses it.
    """
    from areal.utils import stats_tracker

    tokens = report.tokens
    by_prefix = {"": report.active, **{f"{name}/": errs for name, errs in report.others.items()}}
    stats_tracker.denominator(**{"audit/tokens": tokens})
    for prefix, errs in by_prefix.items():
        stats_tracker.stat(**{f"audit/{prefix}{k}": v for k, v in errs.items()}, denominator="audit/tokens")
    stats_tracker.stat(
        **{"audit/max_abs_error": report.active["abs_error"]},
        denominator="audit/tokens",
        reduce_type=stats_tracker.ReduceType.MAX,
    )
    mb_key = f"audit/minibatch_{report.minibatch}"  # π_θ has moved j/n of a version: errors differ by j
    stats_tracker.denominator(**{f"{mb_key}/tokens": tokens})
    for prefix, errs in by_prefix.items():
        stats_tracker.stat(**{f"{mb_key}/{prefix}abs_error": errs["abs_error"]}, denominator=f"{mb_key}/tokens")
    for bucket, sel in report.staleness.items():
        key = f"audit/{bucket}"
        zero = torch.zeros_like(report.behave_gap)
        stats_tracker.denominator(**{f"{key}/tokens": sel})
        stats_tracker.stat(
            **{f"{key}/{prefix}abs_error": torch.where(sel, errs["abs_error"], zero) for prefix, errs in by_prefix.items()},
            **{f"{key}/behave_gap": torch.where(sel, report.behave_gap, zero)},
            denominator=f"{key}/tokens",
        )


class AuditTotals:
    """Token-weighted totals of one step's audit, reduced across ranks into one value per metric.

    ``add`` keeps everything on the device (no host sync); ``reduce`` does two all-reduces (sum and
    max) over ``group`` when it spans several ranks, so every rank gets the same numbers.
    """

    def __init__(self) -> None:
        self._sums: torch.Tensor | None = None  # [n_tokens, Σ metric for metric in TOKEN_METRICS]
        self._max: torch.Tensor | None = None

    def add(self, errors: dict[str, torch.Tensor], tokens: torch.Tensor) -> None:
        tokens = tokens.bool()
        w = tokens.float()
        sums = torch.stack([w.sum()] + [(errors[m] * w).sum() for m in TOKEN_METRICS])
        peak = torch.where(tokens, errors["abs_error"], torch.zeros_like(errors["abs_error"])).max().reshape(1)
        self._sums = sums if self._sums is None else self._sums + sums
        self._max = peak if self._max is None else torch.maximum(self._max, peak)

    @property
    def empty(self) -> bool:
        return self._sums is None

    def reduce(self, group=None) -> dict[str, float]:
        """Means over all audited tokens of all ranks (NaN when there were none), plus the max.

        Every rank takes part in the all-reduces, also one that audited no token (AReaL skips the
        loss of a micro-batch whose tokens are all masked): zeros from it, or its peers would wait."""
        n_sums = 1 + len(TOKEN_METRICS)
        if distributed(group):
            device = device_of(group)
            sums = torch.zeros(n_sums, device=device) if self._sums is None else self._sums.clone().to(device)
            peak = torch.zeros(1, device=device) if self._max is None else self._max.clone().to(device)  # |errors| ≥ 0
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        elif self._sums is None:
            return {m: math.nan for m in AUDIT_METRICS}
        else:
            sums, peak = self._sums, self._max
        values = sums.tolist()
        n = values[0]
        out = {m: (v / n if n > 0 else math.nan) for m, v in zip(TOKEN_METRICS, values[1:])}
        out["max_abs_error"] = peak.item() if n > 0 else math.nan
        return out
