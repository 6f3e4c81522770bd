"""A-3PO's approximated proximal policy: pure tensor functions, no AReaL import.

Notation (AReaL's and the paper's names):

- ``behave_logp``  log π_behave(a_t): the inference engine's logprob of each token, label-aligned.
- ``theta_logp``   log π_θ(a_t): the loss forward's logprob; always used detached here.
- ``versions``     v_t: weight version that generated token t (prompt tokens: -1), label-aligned.
- ``current_version`` k: the trainer engine's version during the step (π_prox of AReaL's
  recompute is π at version k).
- ``minibatch`` j of ``n_minibatches`` n: one optimizer step per minibatch, so inside minibatch j
  π_θ is at version k + j/n.
- ``alpha`` α_t: the weight on π_behave (the paper's α). The weight on π_θ is 1 − α_t.

An *anchor* turns versions into α; an *interpolation* mixes the two policies with α:

- ``loglinear``  log π_prox = α·log π_behave + (1 − α)·log π_θ        (geometric mix)
- ``linear``     π_prox     = α·π_behave     + (1 − α)·π_θ            (arithmetic mix)

Tokens that are not generated (version < 0) or not in ``loss_mask`` get α = 0, hence
π_prox = π_θ (ratio 1): they never influence anything, whatever values they hold.
Every function computes in float32 (float64 stays float64) and is free of host syncs.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

__all__ = [
    "ANCHORS",
    "INTERPOLATIONS",
    "Registry",
    "approximate_prox_logp",
    "interpolate",
    "interpolation_weights",
    "staleness",
]


class Registry(dict):
    """Name → function map that refuses to overwrite a name.

    ``register("name")`` is a decorator; an unknown name in ``get`` raises a ``ValueError`` that
    lists the registered ones.
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable:
        def deco(fn: Callable) -> Callable:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self[name].__qualname__}).")
            self[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable:  # type: ignore[override]
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {sorted(self)}.")
        return self[name]


class AnchorFn(Protocol):
    def __call__(
        self, versions: torch.Tensor, current_version: int, minibatch: int, n_minibatches: int
    ) -> torch.Tensor: ...


class InterpolationFn(Protocol):
    def __call__(self, behave_logp: torch.Tensor, theta_logp: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor: ...


ANCHORS = Registry("anchor")
INTERPOLATIONS = Registry("interpolation")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def staleness(versions: torch.Tensor, current_version: int) -> torch.Tensor:
    """d_t = k − v_t as float32, for every position (prompt tokens give k + 1; mask them yourself).

    Shapes: ``versions`` any shape, integer; returns the same shape.
    """
    return float(current_version) - versions.to(torch.float32)


@ANCHORS.register("paper")
def paper_anchor(versions: torch.Tensor, current_version: int, minibatch: int = 0, n_minibatches: int = 1) -> torch.Tensor:
    """The paper's A-3PO anchor: α_t = 1/d_t for d_t = k − v_t ≥ 1, α_t = 0 for d_t = 0.

    Independent of the minibatch. Prompt tokens (v_t < 0) and versions newer than the trainer
    (d_t < 0) get α_t = 0. Returns float32 with the shape of ``versions``.
    """
    d = staleness(versions, current_version)
    use = (versions >= 0) & (d >= 1)
    return torch.where(use, 1.0 / torch.where(use, d, torch.ones_like(d)), torch.zeros_like(d))


@ANCHORS.register("recompute")
def recompute_anchor(versions: torch.Tensor, current_version: int, minibatch: int = 0, n_minibatches: int = 1) -> torch.Tensor:
    """Calibrated to AReaL's recompute, which returns π at version k.

    Treat log π as linear in the version between π_behave (version v) and π_θ (version
    k + j/n in minibatch j of n). π at version k is then reached with weight on π_θ
    (k − v)/(k + j/n − v), i.e.

        α_t = (j/n) / (k + j/n − v_t),  clamped to [0, 1].

    j = 0 gives α = 0 (π_θ *is* π at version k: exact), v = k with j > 0 gives α = 1
    (π_behave *is* π at version k: exact). Prompt tokens and v_t > k get α = 0.
    Returns float32 with the shape of ``versions``.
    """
    if n_minibatches < 1 or not 0 <= minibatch < n_minibatches:
        raise ValueError(f"minibatch must be in [0, n_minibatches); got minibatch={minibatch}, n_minibatches={n_minibatches}.")
    drift = minibatch / n_minibatches  # j/n: how far π_θ has moved past version k
    denom = staleness(versions, current_version) + drift
    use = (versions >= 0) & (versions <= current_version) & (denom > 0)
    alpha = drift / torch.where(use, denom, torch.ones_like(denom))
    return torch.where(use, alpha.clamp(0.0, 1.0), torch.zeros_like(denom))


@INTERPOLATIONS.register("loglinear")
def loglinear_interpolation(behave_logp: torch.Tensor, theta_logp: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """log π_prox = α·log π_behave + (1 − α)·log π_θ  (written as θ + α·(behave − θ))."""
    return theta_logp + alpha * (behave_logp - theta_logp)


@INTERPOLATIONS.register("linear")
def linear_interpolation(behave_logp: torch.Tensor, theta_logp: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """π_prox = α·π_behave + (1 − α)·π_θ, in log space:

        log π_prox = logaddexp(log α + log π_behave, log(1 − α) + log π_θ)

    exact at α ∈ {0, 1} and stable for very negative logprobs (no exp underflow to log 0).
    """
    return torch.logaddexp(torch.log(alpha) + behave_logp, torch.log1p(-alpha) + theta_logp)


def interpolation_weights(
    versions: torch.Tensor,
    current_version: int,
    *,
    anchor: str = "paper",
    minibatch: int = 0,
    n_minibatches: int = 1,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """α_t (weight on π_behave) of the named anchor; 0 where ``loss_mask`` is false. float32, shape of ``versions``."""
    alpha = ANCHORS.get(anchor)(versions, current_version, minibatch, n_minibatches)
    if loss_mask is not None:
        alpha = torch.where(loss_mask.bool(), alpha, torch.zeros_like(alpha))
    return alpha


def interpolate(
    behave_logp: torch.Tensor, theta_logp: torch.Tensor, alpha: torch.Tensor, *, interpolation: str = "loglinear"
) -> torch.Tensor:
    """Mix log π_behave and the detached log π_θ with weights α (on π_behave) and 1 − α.

    Positions with α = 0 return log π_θ exactly, whatever ``behave_logp`` holds there (NaN, ±inf,
    ±10000): those values are replaced before the arithmetic. Shapes: all three equal.
    """
    fn = INTERPOLATIONS.get(interpolation)
    dtype = _compute_dtype(behave_logp, theta_logp)
    theta = theta_logp.detach().to(dtype)
    alpha = alpha.to(dtype)
    behave = torch.where(alpha > 0, behave_logp.detach().to(dtype), theta)
    return fn(behave, theta, alpha)


def approximate_prox_logp(
    behave_logp: torch.Tensor,
    theta_logp: torch.Tensor,
    versions: torch.Tensor,
    current_version: int,
    *,
    anchor: str = "paper",
    interpolation: str = "loglinear",
    minibatch: int = 0,
    n_minibatches: int = 1,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A-3PO's log π_prox: the ``anchor``'s α mixed by ``interpolation``.

    ``paper`` + ``loglinear`` is the paper's formula: with d = k − v,
    log π_prox = (1/d)·log π_behave + (1 − 1/d)·log π_θ for d ≥ 1 and log π_θ for d = 0.

    Args:
        behave_logp: [B, T] (or packed [N]) log π_behave, label-aligned.
        theta_logp: same shape, log π_θ; detached here.
        versions: same shape, integer versions, label-aligned (prompt = -1).
        current_version: k, the trainer's version during the step.
        anchor, interpolation: registered names (``ANCHORS``, ``INTERPOLATIONS``).
        minibatch, n_minibatches: j and n of the PPO update (used by ``recompute``).
        loss_mask: optional, same shape; masked positions return log π_θ.

    Returns:
        log π_prox, float32 (float64 if an input is), same shape, without gradient.
    """
    if not (behave_logp.shape == theta_logp.shape == versions.shape):
        raise ValueError(
            "behave_logp, theta_logp and versions must have one shape; got "
            f"{tuple(behave_logp.shape)}, {tuple(theta_logp.shape)}, {tuple(versions.shape)}."
        )
    alpha = interpolation_weights(
        versions, current_version, anchor=anchor, minibatch=minibatch, n_minibatches=n_minibatches, loss_mask=loss_mask
    )
    return interpolate(behave_logp, theta_logp, alpha, interpolation=interpolation)
