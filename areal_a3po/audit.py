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
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["AUDIT_METRICS", "AuditTotals", "clip_active", "token_errors"]

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


class AuditTotals:
    """Token-weighted totals of one step's audit, reduced across ranks into one value per metric.

    ``add`` keeps everything on the device (no host sync); ``reduce`` does two all-reduces (sum and
    max) over ``group`` when torch.distributed is initialised, so every rank gets the same numbers.
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
        """Means over all audited tokens of all ranks (NaN when there were none), plus the max."""
        if self._sums is None:
            return {m: math.nan for m in AUDIT_METRICS}
        sums, peak = self._sums.clone(), self._max.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        values = sums.tolist()
        n = values[0]
        out = {m: (v / n if n > 0 else math.nan) for m, v in zip(TOKEN_METRICS, values[1:])}
        out["max_abs_error"] = peak.item() if n > 0 else math.nan
        return out
