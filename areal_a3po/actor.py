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

import dataclasses
import functools
import json
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from areal.engine import FSDPPPOActor
from areal.trainer.ppo.actor import PPOActor, compute_prox_logp_approximations, grpo_loss_fn
from areal.utils import logging, stats_tracker

from areal_a3po.audit import AuditTotals, token_errors
from areal_a3po.config import A3POConfig
from areal_a3po.fallback import FallbackState
from areal_a3po.proximal import ANCHORS, interpolate, interpolation_weights, staleness

logger = logging.getLogger("A3PO")

__all__ = ["A3POActorMixin", "A3POFSDPActor", "A3POPPOActor", "A3POWarning", "STATE_FILE", "a3po_loss_fn"]


class A3POWarning(UserWarning):
    """A condition A-3PO handles but the user should know about (fallback switch, excess staleness)."""


def _warn(message: str) -> None:
    # AReaL's log for the run's log files, and a Python warning for notebooks and tests.
    logger.warning(message)
    warnings.warn(message, A3POWarning, stacklevel=3)


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


def _check_versions(data: dict[str, Any], where: str) -> torch.Tensor:
    versions = _require_versions(data, where)
    if versions.shape != data["logprobs"].shape:
        raise ValueError(
            f"'versions' must have the shape of 'logprobs' {tuple(data['logprobs'].shape)} "
            f"(one weight version per token), got {tuple(versions.shape)} in the {where}."
        )
    if versions.dtype.is_floating_point or versions.dtype.is_complex or versions.dtype == torch.bool:
        raise TypeError(
            f"'versions' must be an integer tensor (weight version per token, -1 for prompt tokens), "
            f"got dtype {versions.dtype} in the {where}; convert it in the workflow with versions.long()."
        )
    return versions


class _StepAudit:
    """What one update step's loss calls share: use the truth for the loss? and the audit totals."""

    def __init__(self, *, use_truth: bool):
        self.use_truth = use_truth
        self.totals = AuditTotals()


def a3po_loss_fn(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    input_data: dict[str, Any],
    *,
    a3po: A3POConfig,
    minibatch: int,
    n_minibatches: int,
    current_version: int,
    step_audit: _StepAudit | None = None,
    **grpo_kwargs: Any,
) -> torch.Tensor:
    """AReaL's ``grpo_loss_fn`` with π_prox from A-3PO instead of the recompute forward.

    ``logprobs`` is the loss forward's log π_θ (with gradient); π_prox is computed from its detached
    copy, ``input_data['logprobs']`` (log π_behave) and ``input_data['versions']`` (label-aligned),
    all packed the same way by the engine. Logs ``a3po/{alpha, staleness, behave_imp_weight,
    importance_weight}`` over the generated, unmasked tokens. When the batch carries AReaL's
    recomputed ``prox_logp`` (an audited step, or the fallback), logs ``a3po/audit/*`` too, and
    trains on the recomputed one if ``step_audit.use_truth`` (fallback mode).
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
    approx = interpolate(behave_logp, theta_logp, alpha, interpolation=a3po.interpolation).to(theta_logp.dtype)
    truth = input_data.get("prox_logp")  # AReaL's recomputed π_prox, when this step computed it
    use_truth = truth is not None and step_audit is not None and step_audit.use_truth
    prox_logp = truth.to(theta_logp.dtype) if use_truth else approx
    tokens = loss_mask & (versions >= 0)
    _check_finite(theta_logp, tokens, minibatch)

    with stats_tracker.scope("a3po"):
        stats_tracker.denominator(a3po_tokens=tokens)
        stats_tracker.stat(
            alpha=alpha.float(),
            staleness=torch.where(tokens, staleness(versions, current_version), 0.0),
            behave_imp_weight=torch.where(tokens, torch.exp(prox_logp - behave_logp.float()), 0.0),
            importance_weight=torch.where(tokens, torch.exp(theta_logp - prox_logp), 0.0),
            denominator="a3po_tokens",
        )
        if truth is not None:
            _audit(
                approx, truth, input_data, theta_logp, tokens, a3po=a3po, minibatch=minibatch,
                n_minibatches=n_minibatches, current_version=current_version, step_audit=step_audit,
                eps_clip=grpo_kwargs.get("eps_clip", 0.2), eps_clip_higher=grpo_kwargs.get("eps_clip_higher"),
            )

    # AReaL's loss with π_prox supplied: 'recompute' is the method that takes it as given.
    grpo_kwargs["prox_logp_method"] = "recompute"
    return grpo_loss_fn(
        logprobs, entropy, {**input_data, "prox_logp": prox_logp}, current_version=current_version, **grpo_kwargs
    )


def _check_finite(theta_logp: torch.Tensor, tokens: torch.Tensor, minibatch: int) -> None:
    # One host sync per micro-batch, like AReaL's own NaN check on π_prox; π_behave was checked
    # before the update started (A3POPPOActor._validate_batch), so a failure here is the model's.
    if not torch.isfinite(torch.where(tokens, theta_logp, 0.0)).all():
        n = int((~torch.isfinite(theta_logp) & tokens).sum())
        raise FloatingPointError(
            f"A-3PO: the loss forward's log π_θ ('logprobs' of the loss function) is NaN/Inf on {n} generated "
            f"token(s) in minibatch {minibatch}: the model has diverged (lower actor.optimizer.lr, enable "
            "gradient clipping, or resume from an earlier checkpoint)."
        )


def _audit(
    approx: torch.Tensor,
    truth: torch.Tensor,
    input_data: dict[str, Any],
    theta_logp: torch.Tensor,
    tokens: torch.Tensor,
    *,
    a3po: A3POConfig,
    minibatch: int,
    n_minibatches: int,
    current_version: int,
    step_audit: _StepAudit | None,
    eps_clip: float,
    eps_clip_higher: float | None,
) -> None:
    """``a3po/audit/*``: the active approximation against the recomputed π_prox, per token.

    Also the other anchor (same interpolation) under ``audit/anchor_<name>/`` and AReaL's built-in
    ``loglinear`` (its formula on its unaligned versions) under ``audit/areal_loglinear/``; the
    ``abs_error`` of every method and the behaviour gap |log π_behave − log π_prox| per staleness
    under ``audit/staleness_<d>/``, and every method's
    ``abs_error`` per minibatch under ``audit/minibatch_<j>/``.
    """
    behave, advantages = input_data["logprobs"], input_data["advantages"]
    errors = lambda x: token_errors(x, truth, behave, theta_logp, advantages, eps_clip=eps_clip, eps_clip_higher=eps_clip_higher)  # noqa: E731
    zero = torch.zeros_like(theta_logp, dtype=torch.float32)
    masked = lambda e: {k: torch.where(tokens, v, zero) for k, v in e.items()}  # noqa: E731

    # Audit stats get their own denominator: they are recorded on audited steps only, and a
    # stats_tracker denominator must have one entry per entry of each stat that uses it.
    stats_tracker.denominator(**{"audit/tokens": tokens})
    mine = errors(approx)
    stats_tracker.stat(**{f"audit/{k}": v for k, v in masked(mine).items()}, denominator="audit/tokens")
    stats_tracker.stat(
        **{"audit/max_abs_error": torch.where(tokens, mine["abs_error"], zero)},
        denominator="audit/tokens",
        reduce_type=stats_tracker.ReduceType.MAX,
    )
    if step_audit is not None:
        step_audit.totals.add(mine, tokens)

    versions = input_data["versions"]
    by_method = {"": mine}
    for other in sorted(set(ANCHORS) - {a3po.anchor}):
        alpha = interpolation_weights(
            versions, current_version, anchor=other, minibatch=minibatch, n_minibatches=n_minibatches, loss_mask=tokens
        )
        by_method[f"anchor_{other}/"] = errors(interpolate(behave, theta_logp, alpha, interpolation=a3po.interpolation))
    areal_versions = input_data.get(AREAL_VERSIONS_KEY)
    if areal_versions is not None:
        areal = compute_prox_logp_approximations(
            old_logp=behave.float(), logprobs=theta_logp.float(), versions=areal_versions,
            current_version=current_version, method="loglinear",
        )["loglinear"]
        by_method["areal_loglinear/"] = errors(areal)
    # By minibatch index j: π_θ has moved j/n of a version, so errors differ by j.
    mb_key = f"audit/minibatch_{minibatch}"
    stats_tracker.denominator(**{f"{mb_key}/tokens": tokens})
    for prefix, errs in by_method.items():
        if prefix:
            stats_tracker.stat(**{f"audit/{prefix}{k}": v for k, v in masked(errs).items()}, denominator="audit/tokens")
        stats_tracker.stat(**{f"{mb_key}/{prefix}abs_error": masked(errs)["abs_error"]}, denominator=f"{mb_key}/tokens")

    # Per staleness d: every method's error, and |log π_behave − log π_prox| (the recomputed truth).
    # For d = 0 in minibatch 0 the two policies have the same weights, so that gap is the mismatch
    # between the inference engine's logprobs and the trainer's (numerics, dtype, kernels).
    d = staleness(versions, current_version)
    behave_gap = (behave.float() - truth.float()).abs()
    for value in torch.unique(d[tokens]).tolist():  # one host sync, on audited steps only
        key = f"audit/staleness_{int(value)}"
        sel = tokens & (d == value)
        stats_tracker.denominator(**{f"{key}/tokens": sel})
        stats_tracker.stat(
            **{f"{key}/{prefix}abs_error": torch.where(sel, errs["abs_error"], zero) for prefix, errs in by_method.items()},
            **{f"{key}/behave_gap": torch.where(sel, behave_gap, zero)},
            denominator=f"{key}/tokens",
        )


#: Key under which an audited batch carries AReaL's own (unaligned) versions, for the comparison.
AREAL_VERSIONS_KEY = "a3po_areal_versions"


class _A3POUpdateEngine:
    """The engine as ``PPOActor._ppo_update`` sees it during one A-3PO update.

    Everything is the real engine's, except ``train_batch``, which numbers the minibatches and
    swaps AReaL's ``grpo_loss_fn`` partial for ``a3po_loss_fn`` with the same arguments.
    """

    def __init__(self, engine: Any, a3po: A3POConfig, n_minibatches: int, step_audit: _StepAudit):
        self._engine = engine
        self._a3po = a3po
        self._n_minibatches = n_minibatches
        self._minibatch = 0
        self._step_audit = step_audit

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
            step_audit=self._step_audit,
        )
        self._minibatch += 1
        return self._engine.train_batch(input_, loss_fn=a3po_loss, loss_weight_fn=loss_weight_fn)


class A3POPPOActor(PPOActor):
    """AReaL's ``PPOActor`` whose decoupled loss takes π_prox from A-3PO when ``prox_logp_method: a3po``.

    Also owns the audit schedule and the fallback state (``self.fallback``), and checks each batch
    for inputs the approximation cannot use (``_validate_batch``).
    """

    def __init__(self, config: Any, engine: Any):
        super().__init__(config, engine)
        self.fallback = FallbackState(**dataclasses.asdict(config.a3po.fallback)) if self.a3po_enabled else FallbackState()
        self._warned_staleness = False

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
                "ppo_n_minibatches=%d, audit_interval=%d, fallback=%s).",
                a3po.anchor,
                a3po.interpolation,
                self.config.ppo_n_minibatches,
                a3po.audit_interval,
                a3po.fallback if a3po.fallback.enabled else "off",
            )

    def is_audit_step(self, version: int) -> bool:
        """Audited steps: trainer version % ``audit_interval`` == 0 (the same on every rank and after recover)."""
        n = self.config.a3po.audit_interval
        return n > 0 and version % n == 0

    def recomputes(self, version: int) -> bool:
        """Whether this step runs AReaL's recompute forward (an audited step, or the fallback is active)."""
        return self.is_audit_step(version) or self.fallback.recomputing

    def compute_advantages(self, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.a3po_enabled:
            # Per trajectory, before AReaL pads them into one batch (padding would hide a short
            # 'versions' behind zeros).
            for i, traj in enumerate(data):
                _check_versions(traj, f"trajectory {i}")
        return super().compute_advantages(data)

    def _compute_advantages(self, data: dict[str, Any]) -> dict[str, Any]:
        if not self.a3po_enabled:
            return super()._compute_advantages(data)
        versions = _check_versions(data, "batch")
        if data["logprobs"].dtype in (torch.float16, torch.bfloat16):
            # Safe behaviour for half-precision behaviour logprobs: upcast once. A-3PO computes in
            # float32 anyway, and AReaL 1.0.4's own loss stats reject anything but float32.
            data["logprobs"] = data["logprobs"].float()
        data = super()._compute_advantages(data)
        # AReaL 1.0.4 rolls logprobs and loss_mask by -1 to label-align them, but not versions:
        # versions[t] would still be the version of token t while logprobs[t] is the logprob of
        # token t+1. A-3PO keys each token on its own version, so align versions the same way.
        data["versions"] = torch.roll(versions, shifts=-1, dims=-1)
        self._validate_batch(data)
        return data

    def _validate_batch(self, data: dict[str, Any]) -> None:
        """Inputs the approximation cannot use, counted with one host sync per step."""
        versions, mask = data["versions"], data["loss_mask"].bool()
        k = self.engine.get_version()
        behave = data["logprobs"]
        counts = torch.stack([
            mask.sum(),
            (mask & ~torch.isfinite(behave)).sum(),
            (mask & (versions < 0)).sum(),
            (mask & (versions > k)).sum(),
            torch.where(mask & (versions >= 0), k - versions, torch.zeros_like(versions)).max(),
        ]).tolist()
        n_tokens, n_nonfinite, n_negative, n_newer, max_d = (int(c) for c in counts)
        if n_tokens == 0:
            raise ValueError(
                "A-3PO: every token of this batch is masked ('loss_mask' has no 1 on any response token), so "
                "there is nothing to train on (AReaL would fail later with 'Global total loss weight must be "
                "positive'). Check the workflow's loss_mask, or drop empty trajectories before training."
            )
        if n_nonfinite:
            raise ValueError(
                f"A-3PO: the behaviour logprobs ('logprobs' from the inference engine) are NaN/Inf on "
                f"{n_nonfinite} generated token(s) with loss_mask=1; π_prox would be NaN there. Fix the "
                "workflow/inference engine, or set loss_mask=0 on those tokens."
            )
        if n_negative:
            raise ValueError(
                f"A-3PO: {n_negative} generated token(s) (loss_mask=1) have a negative 'versions' entry; "
                "versions must hold the weight version that generated each response token (-1 only for "
                "prompt tokens). Record the version in the workflow, or set actor.prox_logp_method=recompute."
            )
        if n_newer:
            raise ValueError(
                f"A-3PO: {n_newer} generated token(s) have 'versions' newer than the trainer's version {k} "
                "(v > k). The inference engine cannot be ahead of the trainer: check that the trainer's "
                "version is restored on recover (engine.set_version) and that rollout.set_version follows it."
            )
        limit = self.config.a3po.max_staleness
        if limit is not None and max_d > limit and not self._warned_staleness:
            self._warned_staleness = True
            _warn(
                f"A-3PO: tokens with staleness {max_d} > {limit} (actor.a3po.max_staleness, by default "
                f"rollout.max_head_offpolicyness) at trainer version {k}; the approximation is less accurate "
                "for very stale tokens. Going on; this is reported once."
            )

    def _ppo_update(self, data: dict[str, Any]) -> None:
        if not self.a3po_enabled:
            return super()._ppo_update(data)
        _require_versions(data, "ppo_update")
        version = self.engine.get_version()
        if data.get("prox_logp") is None and self.recomputes(version):
            # AReaL's recompute forward (the same call as its trainer's recompute_logp phase); the
            # batch is label-aligned already, which the forward does not read.
            with stats_tracker.record_timing("a3po_recompute_logp"):
                data["prox_logp"] = self._compute_logp(data)
        has_truth = data.get("prox_logp") is not None
        step_audit = _StepAudit(use_truth=self.fallback.recomputing and has_truth)
        if has_truth:
            data[AREAL_VERSIONS_KEY] = torch.roll(data["versions"], shifts=1, dims=-1)  # undo our alignment
        engine = self.engine
        self.engine = _A3POUpdateEngine(engine, self.config.a3po, self.config.ppo_n_minibatches, step_audit)
        try:
            super()._ppo_update(data)
        finally:
            self.engine = engine
        value = None
        if has_truth and self.fallback.enabled:
            value = step_audit.totals.reduce(getattr(engine, "data_parallel_group", None))[self.fallback.metric]
        with stats_tracker.scope("update"):  # next to the loss's a3po/* stats
            stats_tracker.scalar(**{"a3po/recompute_mode": float(step_audit.use_truth)})
            if value is not None:
                stats_tracker.scalar(**{f"a3po/audit/fallback_{self.fallback.metric}": value})
        if value is not None:
            transition = self.fallback.observe(value, step=version)
            if transition is not None:
                _warn(transition.message())

    def state_dict(self) -> dict[str, Any]:
        return {"fallback": self.fallback.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fallback.load_state_dict(state["fallback"])


#: The A-3PO state saved with each checkpoint of the actor (AReaL's recover checkpoints included).
STATE_FILE = "a3po_state.json"


class A3POActorMixin:
    """Put before an AReaL PPO actor engine class to make its ``.actor`` an ``A3POPPOActor``.

    AReaL's actor engines build ``self.actor = PPOActor(config, self)`` in ``__init__``; we call
    through and replace it (``compute_logp``/``compute_advantages``/``ppo_update`` delegate to it).
    """

    def __init__(self, config: Any):
        super().__init__(config)  # type: ignore[call-arg]
        self.actor = A3POPPOActor(config, self)

    def save(self, meta: Any) -> None:
        """AReaL's save, plus the A-3PO state (fallback mode) as ``STATE_FILE`` next to the weights."""
        super().save(meta)  # type: ignore[misc]
        if getattr(self.actor, "a3po_enabled", False) and (not dist.is_initialized() or dist.get_rank() == 0):
            os.makedirs(meta.path, exist_ok=True)
            with open(os.path.join(meta.path, STATE_FILE), "w") as f:
                json.dump(self.actor.state_dict(), f, indent=1)

    def load(self, meta: Any) -> None:
        """AReaL's load, plus the A-3PO state when the checkpoint has one (every rank reads it)."""
        super().load(meta)  # type: ignore[misc]
        path = os.path.join(meta.path, STATE_FILE)
        if getattr(self.actor, "a3po_enabled", False) and os.path.exists(path):
            with open(path) as f:
                self.actor.load_state_dict(json.load(f))


class A3POFSDPActor(A3POActorMixin, FSDPPPOActor):
    """Drop-in for ``areal.engine.FSDPPPOActor``: ``A3POFSDPActor(config=A3POActorConfig(...))``."""
