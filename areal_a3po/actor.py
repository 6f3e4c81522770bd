"""The hook into AReaL's PPO actor: A-3PO supplies π_prox inside the actor update.

``A3POPPOActor`` subclasses AReaL's ``PPOActor`` and calls through to it. With
``prox_logp_method: a3po`` it changes exactly two things:

1. ``_compute_advantages`` label-aligns ``versions``: AReaL rolls ``logprobs`` and ``loss_mask`` by
   −1 but leaves ``versions`` one token off (AReaL 1.0.4, ``PPOActor._compute_advantages``); its
   built-in ``loglinear`` then keys each token on its *predecessor's* version. We roll it too, and
   keep AReaL's unaligned versions next to it for the audit's comparison with AReaL's method.
2. ``_ppo_update`` runs AReaL's update unchanged, except that each minibatch's loss is
   ``areal_a3po.loss.a3po_loss_fn`` (π_prox = α·log π_behave + (1 − α)·log π_θ, then AReaL's own
   ``grpo_loss_fn``), through a view of the engine that is in place only during that call.

It also decides which steps run AReaL's recompute forward (audited steps: version % audit_interval
== 0, and every step while the fallback is in ``recompute`` mode) and feeds the fallback the
audited value. With any other ``prox_logp_method`` the actor is AReaL's, call for call.

With several ranks, each checks its own shard and the ranks then agree (``areal_a3po.ranks``):
the batch checks in ``compute_advantages`` (one all-gather per step), the NaN check of the loss
after each minibatch, the fallback's value (all-reduced token totals); warnings and the
configuration line come from rank 0 only.

Backends: ``A3POActorMixin`` swaps AReaL's ``PPOActor`` for ours in any AReaL PPO actor engine and
saves/loads the A-3PO state (the fallback's mode) with each checkpoint; ``A3POFSDPActor`` is the FSDP
one. Megatron and Archon take the mixin with one class line each (``areal_a3po.megatron``,
``areal_a3po.archon``), importable where their dependencies are installed.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from areal.engine import FSDPPPOActor
from areal.trainer.ppo.actor import PPOActor
from areal.utils import logging, stats_tracker

from areal_a3po.batch import agree_on_batch, batch_error, check_versions, count_batch, require_versions
from areal_a3po.checkpoint import STATE_FILE, load_state, resumable, save_state
from areal_a3po.fallback import FallbackState
from areal_a3po.loss import AREAL_VERSIONS_KEY, A3POUpdateEngine, StepAudit, a3po_loss_fn
from areal_a3po.ranks import is_rank_zero
from areal_a3po.weight_sync import BoundedWeightSyncMixin

logger = logging.getLogger("A3PO")

__all__ = [
    "AREAL_VERSIONS_KEY",
    "A3POActorMixin",
    "A3POFSDPActor",
    "A3POPPOActor",
    "A3POWarning",
    "STATE_FILE",
    "a3po_loss_fn",
]


class A3POWarning(UserWarning):
    """A condition A-3PO handles but the user should know about (fallback switch, excess staleness)."""


def _warn(message: str) -> None:
    # AReaL's log for the run's log files, and a Python warning for notebooks and tests; rank 0 only:
    # what is warned about is decided on values every rank shares.
    if is_rank_zero():
        logger.warning(message)
        warnings.warn(message, A3POWarning, stacklevel=3)


class A3POPPOActor(PPOActor):
    """AReaL's ``PPOActor`` whose decoupled loss takes π_prox from A-3PO when ``prox_logp_method: a3po``.

    Also owns the audit schedule and the fallback state (``self.fallback``), and checks each batch
    for inputs the approximation cannot use (``areal_a3po.batch``).
    """

    def __init__(self, config: Any, engine: Any):
        super().__init__(config, engine)
        self.fallback = FallbackState(**dataclasses.asdict(config.a3po.fallback)) if self.a3po_enabled else FallbackState()
        self._warned_staleness = False
        self._counts = None  # this rank's BatchCounts of the batch in compute_advantages

    @property
    def a3po_enabled(self) -> bool:
        return bool(getattr(self.config, "a3po_enabled", False))

    def _log_configuration(self) -> None:
        # Called by PPOActor.__init__, before the engine has its process group (so before we know
        # the rank). The engine's own PPOActor has logged AReaL's block already; ours is logged once,
        # by rank 0, when the engine creates its process group (A3POActorMixin).
        pass

    def log_configuration(self) -> None:
        """One line with the A-3PO settings (rank 0 only). AReaL's configuration block, logged by
        every rank, shows a3po as "UNKNOWN (a3po)": its table does not know the plugin."""
        if self.a3po_enabled and is_rank_zero():
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
        if not self.a3po_enabled:
            return super().compute_advantages(data)
        # This rank's checks, then one all-gather: a bad shard on any rank, or any other error here (a
        # CUDA out-of-memory in AReaL's advantages, say), stops every rank with the same error before
        # the update's collectives, where the others would wait for it for ever.
        error, out, self._counts = None, None, None
        try:
            # Per trajectory, before AReaL pads them into one batch (padding would hide a short
            # 'versions' behind zeros).
            for i, traj in enumerate(data):
                check_versions(traj, f"trajectory {i}")
            out = super().compute_advantages(data)  # counts the batch (_compute_advantages)
        except Exception as exc:  # noqa: BLE001 - raised on every rank by agree_on_batch
            error = exc
        k = self.engine.get_version()
        counts = agree_on_batch(self._counts, error, getattr(self.engine, "data_parallel_group", None))
        problem = batch_error(counts, k)  # on the group's counts: the same on every rank
        if problem is not None:
            raise problem
        limit = self.config.a3po.max_staleness
        if limit is not None and counts.max_staleness > limit and not self._warned_staleness:
            self._warned_staleness = True
            _warn(
                f"A-3PO: tokens with staleness {counts.max_staleness} > {limit} (actor.a3po.max_staleness, by "
                f"default rollout.max_head_offpolicyness) at trainer version {k}; the approximation is less "
                "accurate for very stale tokens. Going on; this is reported once."
            )
        return out

    def _compute_advantages(self, data: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        # AReaL 2.0 passes the batch's trajectory group sizes as a second argument; 1.0.4 nothing.
        if not self.a3po_enabled:
            return super()._compute_advantages(data, *args, **kwargs)
        versions = check_versions(data, "batch")
        if data["logprobs"].dtype in (torch.float16, torch.bfloat16):
            # Safe behaviour for half-precision behaviour logprobs: upcast once. A-3PO computes in
            # float32 anyway, and AReaL 1.0.4's own loss stats reject anything but float32.
            data["logprobs"] = data["logprobs"].float()
        data = super()._compute_advantages(data, *args, **kwargs)
        # AReaL (1.0.4, 2.0.0) rolls logprobs and loss_mask by -1 to label-align them, but not versions:
        # versions[t] would still be the version of token t while logprobs[t] is the logprob of
        # token t+1. A-3PO keys each token on its own version, so align versions the same way.
        data["versions"] = torch.roll(versions, shifts=-1, dims=-1)
        # AReaL's own versions, for the audit's 'areal_loglinear'. Kept, not rebuilt by rolling back
        # in _ppo_update: AReaL cuts each row to its own length after this call and pads it again for
        # the update, so the aligned row's last entry (its position 0, -1) is gone by then.
        data[AREAL_VERSIONS_KEY] = versions
        # Judged in compute_advantages, together with the other ranks' counts.
        self._counts = count_batch(data["versions"], data["loss_mask"], data["logprobs"], self.engine.get_version())
        return data

    def _ppo_update(self, data: dict[str, Any]) -> None:
        if not self.a3po_enabled:
            return super()._ppo_update(data)
        require_versions(data, "ppo_update")
        version = self.engine.get_version()
        if data.get("prox_logp") is None and self.recomputes(version):
            # AReaL's recompute forward (the same call as its trainer's recompute_logp phase); the
            # batch is label-aligned already, which the forward does not read.
            with stats_tracker.record_timing("a3po_recompute_logp"):
                data["prox_logp"] = self._compute_logp(data)
        has_truth = data.get("prox_logp") is not None
        if not has_truth:
            data.pop(AREAL_VERSIONS_KEY, None)  # only the audit reads it
        step_audit = StepAudit(use_truth=self.fallback.recomputing and has_truth, audited=has_truth)
        engine = self.engine
        self.engine = A3POUpdateEngine(engine, self.config.a3po, self.config.ppo_n_minibatches, step_audit)
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


class A3POActorMixin(BoundedWeightSyncMixin):
    """Put before an AReaL PPO actor engine class to make its ``.actor`` an ``A3POPPOActor``.

    AReaL's actor engines build ``self.actor = PPOActor(config, self)`` in ``__init__``; we call
    through and replace it (``compute_logp``/``compute_advantages``/``ppo_update`` delegate to it).
    ``save``/``load`` add the actor's state (the fallback's mode) as ``STATE_FILE`` next to the
    weights, written and read by rank 0 for every rank (``areal_a3po.checkpoint``). The xccl
    weight-update group forms within ``actor.weight_update_group_timeout`` or fails naming the
    servers (``areal_a3po.weight_sync``), whatever ``prox_logp_method`` is.
    """

    def __init__(self, config: Any):
        super().__init__(config)  # type: ignore[call-arg]
        self.actor = A3POPPOActor(config, self)

    def create_process_group(self, *args: Any, **kwargs: Any) -> Any:
        """AReaL's, then the A-3PO configuration line, once (rank 0): the rank is known from here on."""
        out = super().create_process_group(*args, **kwargs)  # type: ignore[misc]
        self.actor.log_configuration()
        return out

    def save(self, meta: Any) -> None:
        """AReaL's save, plus the A-3PO state (fallback mode) as ``STATE_FILE`` next to the weights of a
        checkpoint a run resumes from (not in the Saver's Hugging Face exports)."""
        super().save(meta)  # type: ignore[misc]
        if self.actor.a3po_enabled and resumable(meta):
            save_state(meta.path, self.actor.state_dict())

    def load(self, meta: Any) -> None:
        """AReaL's load, plus the A-3PO state: rank 0 reads it, every rank resumes in its mode."""
        super().load(meta)  # type: ignore[misc]
        if not (self.actor.a3po_enabled and resumable(meta)):
            return
        state = load_state(meta.path)
        if state is not None:
            self.actor.load_state_dict(state)
        elif self.actor.fallback.enabled:
            _warn(
                f"A-3PO: the checkpoint {meta.path} has no {STATE_FILE} (written by a run without "
                "prox_logp_method=a3po, or lost), so the fallback's mode is not known; it resumes in "
                f"'{self.actor.fallback.mode}' mode and decides again at the next audit."
            )


class A3POFSDPActor(A3POActorMixin, FSDPPPOActor):
    """Drop-in for ``areal.engine.FSDPPPOActor``: ``A3POFSDPActor(config=A3POActorConfig(...))``."""
