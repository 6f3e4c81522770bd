"""The hook into AReaL's PPO actor: A-3PO supplies π_prox inside the actor update.

``A3POPPOActor`` subclasses AReaL's ``PPOActor`` and calls through to it. With
``prox_logp_method: a3po`` it changes exactly two things:

1. ``_compute_advantages`` label-aligns ``versions``: AReaL rolls ``logprobs`` and ``loss_mask`` by
   −1 but leaves ``versions`` one token off (AReaL 1.0.4, ``PPOActor._compute_advantages``); its
   built-in ``loglinear`` then keys each token on its *predecessor's* version. We roll it too.
2. ``_ppo_update`` runs AReaL's update unchanged, except that each minibatch's loss function first
   computes π_prox from π_behave and the detached π_θ (``a3po_loss_fn``) and then calls AReaL's own
   ``grpo_loss_fn`` with it, so rejection sampling, M2PO, GSPO, dual clip and every stat behave as
   in AReaL. The minibatch index j (needed by ``anchor: recompute``) is counted by a thin view of the
   engine that is in place only during that call.

With any other ``prox_logp_method`` the actor is AReaL's, call for call.

Backends: ``A3POActorMixin`` swaps AReaL's ``PPOActor`` for ours in any AReaL PPO actor engine;
``A3POFSDPActor`` is the FSDP one. Megatron and Archon take it with one class line each
(``areal_a3po.backends``), importable where their dependencies are installed.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from areal.engine import FSDPPPOActor
from areal.trainer.ppo.actor import PPOActor, grpo_loss_fn
from areal.utils import logging, stats_tracker

from areal_a3po.config import A3POConfig
from areal_a3po.proximal import interpolate, interpolation_weights, staleness

logger = logging.getLogger("A3PO")

__all__ = ["A3POActorMixin", "A3POFSDPActor", "A3POPPOActor", "a3po_loss_fn"]


def _require_versions(data: dict[str, Any], where: str) -> torch.Tensor:
    versions = data.get("versions")
    if versions is None:
        raise KeyError(
            f"actor.prox_logp_method=a3po needs the per-token 'versions' tensor in the batch ({where}), "
            "but the batch has none. AReaL's inference engines record it for every rollout; a custom "
            "workflow must return 'versions' (weight version per token, -1 for prompt tokens), or set "
            "actor.prox_logp_method=recompute."
        )
    return versions


def a3po_loss_fn(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    input_data: dict[str, Any],
    *,
    a3po: A3POConfig,
    minibatch: int,
    n_minibatches: int,
    current_version: int,
    **grpo_kwargs: Any,
) -> torch.Tensor:
    """AReaL's ``grpo_loss_fn`` with π_prox from A-3PO instead of the recompute forward.

    ``logprobs`` is the loss forward's log π_θ (with gradient); π_prox is computed from its detached
    copy, ``input_data['logprobs']`` (log π_behave) and ``input_data['versions']`` (label-aligned),
    all packed the same way by the engine. Logs ``a3po/{alpha, staleness, behave_imp_weight,
    importance_weight}`` over the generated, unmasked tokens.
    """
    versions = _require_versions(input_data, "loss function")
    behave_logp = input_data["logprobs"]
    loss_mask = input_data["loss_mask"].bool()
    theta_logp = logprobs.detach()
    alpha = interpolation_weights(
        versions,
        current_version,
        anchor=a3po.anchor,
        minibatch=minibatch,
        n_minibatches=n_minibatches,
        loss_mask=loss_mask,
    )
    prox_logp = interpolate(behave_logp, theta_logp, alpha, interpolation=a3po.interpolation).to(theta_logp.dtype)

    with stats_tracker.scope("a3po"):
        tokens = loss_mask & (versions >= 0)
        stats_tracker.denominator(a3po_tokens=tokens)
        stats_tracker.stat(
            alpha=alpha.float(),
            staleness=torch.where(tokens, staleness(versions, current_version), 0.0),
            behave_imp_weight=torch.where(tokens, torch.exp(prox_logp - behave_logp.float()), 0.0),
            importance_weight=torch.where(tokens, torch.exp(theta_logp - prox_logp), 0.0),
            denominator="a3po_tokens",
        )
        truth = input_data.get("prox_logp")  # AReaL's recomputed π_prox, when a step computed it
        if truth is not None:
            _log_audit(prox_logp, truth.float(), behave_logp.float(), tokens)

    # AReaL's loss with π_prox supplied: 'recompute' is the method that takes it as given.
    grpo_kwargs["prox_logp_method"] = "recompute"
    return grpo_loss_fn(
        logprobs, entropy, {**input_data, "prox_logp": prox_logp}, current_version=current_version, **grpo_kwargs
    )


def _log_audit(prox_logp: torch.Tensor, truth: torch.Tensor, behave_logp: torch.Tensor, tokens: torch.Tensor) -> None:
    """``a3po/audit/*``: how far the approximated π_prox is from the recomputed one, per token."""
    zero = torch.zeros_like(prox_logp)
    err = torch.where(tokens, (prox_logp - truth).abs(), zero)
    weight_err = torch.where(tokens, (torch.exp(prox_logp - behave_logp) - torch.exp(truth - behave_logp)).abs(), zero)
    stats_tracker.stat(
        **{"audit/abs_error": err, "audit/behave_imp_weight_abs_error": weight_err}, denominator="a3po_tokens"
    )


class _A3POUpdateEngine:
    """The engine as ``PPOActor._ppo_update`` sees it during one A-3PO update.

    Everything is the real engine's, except ``train_batch``, which numbers the minibatches and
    swaps AReaL's ``grpo_loss_fn`` partial for ``a3po_loss_fn`` with the same arguments.
    """

    def __init__(self, engine: Any, a3po: A3POConfig, n_minibatches: int):
        self._engine = engine
        self._a3po = a3po
        self._n_minibatches = n_minibatches
        self._minibatch = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def train_batch(self, input_: Any, loss_fn: Any, loss_weight_fn: Any) -> dict[str, float]:
        if not (isinstance(loss_fn, functools.partial) and loss_fn.func is grpo_loss_fn):
            raise RuntimeError(
                "areal-a3po expected PPOActor._ppo_update to pass functools.partial(grpo_loss_fn, ...) "
                f"to train_batch, got {loss_fn!r}; this areal version is not supported (need areal==1.0.4)."
            )
        if self._minibatch >= self._n_minibatches:
            raise RuntimeError(
                f"PPO update ran more minibatches than actor.ppo_n_minibatches={self._n_minibatches}."
            )
        a3po_loss = functools.partial(
            a3po_loss_fn,
            **loss_fn.keywords,
            a3po=self._a3po,
            minibatch=self._minibatch,
            n_minibatches=self._n_minibatches,
        )
        self._minibatch += 1
        return self._engine.train_batch(input_, loss_fn=a3po_loss, loss_weight_fn=loss_weight_fn)


class A3POPPOActor(PPOActor):
    """AReaL's ``PPOActor`` whose decoupled loss takes π_prox from A-3PO when ``prox_logp_method: a3po``."""

    @property
    def a3po_enabled(self) -> bool:
        return bool(getattr(self.config, "a3po_enabled", False))

    def _log_configuration(self) -> None:
        # The engine's own PPOActor has already logged AReaL's configuration block (where a3po
        # shows as "UNKNOWN (a3po)": AReaL's table does not know the plugin); add ours only.
        if self.a3po_enabled:
            a3po = self.config.a3po
            logger.info(
                "A-3PO: π_prox approximated without a forward pass (anchor=%s, interpolation=%s, "
                "ppo_n_minibatches=%d).",
                a3po.anchor,
                a3po.interpolation,
                self.config.ppo_n_minibatches,
            )

    def _compute_advantages(self, data: dict[str, Any]) -> dict[str, Any]:
        if not self.a3po_enabled:
            return super()._compute_advantages(data)
        versions = _require_versions(data, "compute_advantages")
        if versions.shape != data["logprobs"].shape:
            raise ValueError(
                f"'versions' must have the shape of 'logprobs' {tuple(data['logprobs'].shape)}, "
                f"got {tuple(versions.shape)}."
            )
        data = super()._compute_advantages(data)
        # AReaL 1.0.4 rolls logprobs and loss_mask by -1 to label-align them, but not versions:
        # versions[t] would still be the version of token t while logprobs[t] is the logprob of
        # token t+1. A-3PO keys each token on its own version, so align versions the same way.
        data["versions"] = torch.roll(versions, shifts=-1, dims=-1)
        return data

    def _ppo_update(self, data: dict[str, Any]) -> None:
        if not self.a3po_enabled:
            return super()._ppo_update(data)
        _require_versions(data, "ppo_update")
        engine = self.engine
        self.engine = _A3POUpdateEngine(engine, self.config.a3po, self.config.ppo_n_minibatches)
        try:
            super()._ppo_update(data)
        finally:
            self.engine = engine


class A3POActorMixin:
    """Put before an AReaL PPO actor engine class to make its ``.actor`` an ``A3POPPOActor``.

    AReaL's actor engines build ``self.actor = PPOActor(config, self)`` in ``__init__``; we call
    through and replace it (``compute_logp``/``compute_advantages``/``ppo_update`` delegate to it).
    """

    def __init__(self, config: Any):
        super().__init__(config)  # type: ignore[call-arg]
        self.actor = A3POPPOActor(config, self)


class A3POFSDPActor(A3POActorMixin, FSDPPPOActor):
    """Drop-in for ``areal.engine.FSDPPPOActor``: ``A3POFSDPActor(config=A3POActorConfig(...))``."""
