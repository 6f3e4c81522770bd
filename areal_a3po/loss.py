"""A-3PO's loss: AReaL's ``grpo_loss_fn`` with π_prox approximated instead of recomputed.

In minibatch j of n at trainer version k, per label-aligned token t with version v_t:

    α_t = anchor(v_t, k, j, n)                     (``paper``: 1/(k − v_t), 0 at v_t = k; ``recompute``: (j/n)/(k + j/n − v_t))
    log π_prox = α_t·log π_behave + (1 − α_t)·log π_θ    (``loglinear``; ``linear`` mixes probabilities)

with log π_θ the loss forward's own logprobs, detached. π_prox then goes to AReaL's ``grpo_loss_fn``
as a given π_prox (its ``recompute`` method), so rejection sampling, M2PO, GSPO, dual clip and
every stat behave as in AReaL.

The loss of one micro-batch, in three parts:

- ``micro_batch_prox_logp``: π_prox (the approximation, or AReaL's recomputed π_prox in the fallback's
  recompute mode) and its ``a3po/*`` statistics;
- the check of log π_θ (a NaN/Inf log π_θ on a generated token: the model diverged);
- ``audit_micro_batch`` on audited steps: every method's error against the recomputed π_prox;
- on every step, ``log_tag_check``: do the tokens tagged with the trainer's version match π_θ in
  minibatch 0, as tokens of that version must (``a3po/tag_check/*``)?

``A3POUpdateEngine`` is the engine as ``PPOActor._ppo_update`` sees it during one A-3PO update.
AReaL (1.0.4, 2.0.0) has no hook for the update's loss: ``_ppo_update`` builds
``functools.partial(grpo_loss_fn, ...)`` inline and hands it to ``engine.train_batch`` once per
minibatch. The view swaps that partial for ``a3po_loss_fn`` with the same arguments plus the
minibatch index j (which AReaL does not pass to its loss) and refuses any other loss; everything
else is the engine's. After each minibatch, every rank learns (one all-gather) whether the loss
failed on any rank, and then all raise one error.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from areal.trainer.ppo.actor import compute_prox_logp_approximations, grpo_loss_fn
from areal.utils import stats_tracker

from areal_a3po.areal_compat import AREAL_VERSION, STAND_IN_METHOD, TESTED_VERSIONS
from areal_a3po.audit import AuditInputs, AuditTotals, audit_report, log_audit_report
from areal_a3po.batch import check_theta_finite, nonfinite_theta, require_versions, theta_error
from areal_a3po.config import A3POConfig
from areal_a3po.proximal import ANCHORS, interpolate, interpolation_weights, staleness
from areal_a3po.ranks import gather_rows, raise_together

__all__ = [
    "AREAL_VERSIONS_KEY", "TAG_CHECK_GAP", "A3POUpdateEngine", "StepAudit", "a3po_loss_fn", "log_tag_check", "micro_batch_prox_logp",
]

#: Key under which a batch carries AReaL's own (unaligned) versions, for the audit's comparison
#: with AReaL's ``loglinear``.
AREAL_VERSIONS_KEY = "a3po_areal_versions"
#: The audit's names for AReaL's own approximations, compared on audited steps: ``loglinear`` (its
#: proximal version k − 1, on its unaligned versions) and AReaL 2.0's ``reuse_train_logp`` (π_θ of the
#: loss's forward, detached; reported on 1.0.4 too, where it is what 2.0 would use).
AREAL_LOGLINEAR = "areal_loglinear"
AREAL_REUSE_TRAIN_LOGP = "areal_reuse_train_logp"
#: ``a3po/tag_check/suspect_tokens``: a token tagged with the trainer's version whose
#: |log π_behave − log π_θ| in minibatch 0 is above this. Mis-tagging a token moves its log π̂_prox by
#: up to that gap (its α changes); below 1e-2 that is under 1% of the PPO ratio, far inside the clip
#: (ε = 0.2), so 1e-2 counts the mis-tags that matter. It is 10⁴× a float32 engine's mismatch (~1e-7,
#: max ~1e-6 at equal weights) and below the one-version drift of most tokens at the CPU configs' lr
#: (0.06–0.15 on average, 0.2–0.6 at most; the least-moved tokens drift less and are not counted).
#: A bfloat16 engine's mismatch averages ~1e-3 with a long tail: there the count also holds the tail.
TAG_CHECK_GAP = 1e-2


class StepAudit:
    """What one update step's loss calls share: use the truth for the loss? is the step audited? the
    audit totals, the loss calls so far, and, for the current minibatch, the count of generated tokens
    whose log π_θ was NaN/Inf (on the device) and the first error of the plugin's part of the loss."""

    def __init__(self, *, use_truth: bool, audited: bool = False):
        self.use_truth = use_truth
        self.audited = audited
        self.totals = AuditTotals()
        self.loss_calls = 0
        self.nonfinite_theta: torch.Tensor | None = None
        self.error: BaseException | None = None

    def count_nonfinite_theta(self, n: torch.Tensor) -> None:
        self.nonfinite_theta = n if self.nonfinite_theta is None else self.nonfinite_theta + n

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error

    def take_minibatch(self) -> tuple[int, BaseException | None]:
        """The minibatch's NaN/Inf log π_θ count (one host sync) and error, reset for the next minibatch."""
        n, error = self.nonfinite_theta, self.error
        self.nonfinite_theta, self.error = None, None
        return (0 if n is None else int(n)), error


@dataclass(frozen=True)
class Position:
    """Where a micro-batch sits in the update: trainer version k, minibatch j of n."""

    current_version: int
    minibatch: int
    n_minibatches: int


def a3po_loss_fn(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    input_data: dict[str, Any],
    *,
    a3po: A3POConfig,
    minibatch: int,
    n_minibatches: int,
    current_version: int,
    step_audit: StepAudit | None = None,
    **grpo_kwargs: Any,
) -> torch.Tensor:
    """AReaL's ``grpo_loss_fn`` with π_prox from A-3PO instead of the recompute forward.

    ``logprobs`` is the loss forward's log π_θ (with gradient); π_prox is computed from its detached
    copy, ``input_data['logprobs']`` (log π_behave) and ``input_data['versions']`` (label-aligned),
    all packed the same way by the engine (``micro_batch_prox_logp``).

    Called on its own (``step_audit`` None), a problem raises here. Inside the update
    (``A3POUpdateEngine``) it is recorded instead, π_prox = π_θ for this micro-batch (ratio 1), and every
    rank raises after the minibatch: raising on this rank alone would leave the other ranks waiting in
    FSDP's backward.
    """
    position = Position(current_version, minibatch, n_minibatches)
    clip = (grpo_kwargs.get("eps_clip", 0.2), grpo_kwargs.get("eps_clip_higher"))  # AReaL's ε and ε_high, for the audit
    theta_logp = logprobs.detach()
    if step_audit is None:
        prox_logp = micro_batch_prox_logp(theta_logp, input_data, a3po, position, clip, step_audit)
    else:
        step_audit.loss_calls += 1
        try:
            prox_logp = micro_batch_prox_logp(theta_logp, input_data, a3po, position, clip, step_audit)
        except Exception as exc:  # noqa: BLE001 - raised on every rank after the minibatch
            step_audit.fail(exc)
            prox_logp = theta_logp
    # AReaL's loss with π_prox supplied: its 'recompute' method takes it as given.
    return grpo_loss_fn(
        logprobs, entropy, {**input_data, "prox_logp": prox_logp}, current_version=current_version,
        **{**grpo_kwargs, "prox_logp_method": STAND_IN_METHOD},
    )


def micro_batch_prox_logp(
    theta_logp: torch.Tensor, input_data: dict[str, Any], a3po: A3POConfig, position: Position,
    clip: tuple[float, float | None], step_audit: StepAudit | None,
) -> torch.Tensor:
    """log π_prox of one micro-batch, with its ``a3po/{alpha, staleness, behave_imp_weight,
    importance_weight}`` stats over the generated, unmasked tokens. When the batch carries AReaL's
    recomputed ``prox_logp`` (an audited step, or the fallback), also ``a3po/audit/*``
    (``audit_micro_batch``), and the recomputed one is used if ``step_audit.use_truth`` (fallback mode)."""
    versions = require_versions(input_data, "loss function")
    behave_logp = input_data["logprobs"]
    tokens = input_data["loss_mask"].bool() & (versions >= 0)
    d = staleness(versions, position.current_version)
    alpha = interpolation_weights(versions, anchor=a3po.anchor, loss_mask=tokens, **vars(position))
    approx = interpolate(behave_logp, theta_logp, alpha, interpolation=a3po.interpolation).to(theta_logp.dtype)
    truth = input_data.get("prox_logp")  # AReaL's recomputed π_prox, when this step computed it
    use_truth = truth is not None and step_audit is not None and step_audit.use_truth
    prox_logp = truth.to(theta_logp.dtype) if use_truth else approx

    if step_audit is None:
        check_theta_finite(theta_logp, tokens, position.minibatch)  # called on its own: raise here
    else:
        # Counted now, raised on every rank after the minibatch (A3POUpdateEngine). Until then π_prox is
        # kept finite, or AReaL's own check of π_prox would raise on this rank alone; the NaN loss gives
        # a NaN gradient norm, so AReaL skips the optimizer step.
        step_audit.count_nonfinite_theta(nonfinite_theta(theta_logp, tokens))
        prox_logp = torch.nan_to_num(prox_logp, nan=0.0, posinf=0.0, neginf=0.0)

    with stats_tracker.scope("a3po"):
        stats_tracker.denominator(a3po_tokens=tokens)
        stats_tracker.stat(
            alpha=alpha.float(),
            staleness=torch.where(tokens, d, 0.0),
            behave_imp_weight=torch.where(tokens, torch.exp(prox_logp - behave_logp.float()), 0.0),
            importance_weight=torch.where(tokens, torch.exp(theta_logp - prox_logp), 0.0),
            denominator="a3po_tokens",
        )
        log_tag_check(behave_logp, theta_logp, tokens & (d == 0), position.minibatch)
        if truth is not None:
            audit_micro_batch(approx, truth, theta_logp, input_data, a3po, position, clip, tokens, d, step_audit)
    return prox_logp


def log_tag_check(behave_logp: torch.Tensor, theta_logp: torch.Tensor, fresh: torch.Tensor, minibatch: int) -> None:
    """``a3po/tag_check/*`` of one micro-batch, on every step: do the tokens tagged with the trainer's
    version behave as if that version generated them?

    In minibatch 0 no optimizer step of this update has run yet, so π_θ is the policy at the trainer's
    version k, and a token tagged d = 0 should have log π_behave = log π_θ up to the engine mismatch.
    Keys (under the current scope, the actor's ``a3po``):

    - ``tag_check/tokens``: the tokens checked (generated, unmasked, d = 0, minibatch 0), a count;
    - ``tag_check/suspect_tokens``: of those, the ones with |log π_behave − log π_θ| >
      ``TAG_CHECK_GAP`` (a count): on a float32 engine, tokens that the version they are tagged with
      did not generate (a stale token tagged current counts only if its one-version drift is above
      the threshold, so this is a lower bound); on a bfloat16 engine also the mismatch's tail;
    - ``tag_check/behave_gap``: |log π_behave − log π_θ| over the checked tokens (avg/min/max).

    Recorded in every micro-batch of every minibatch (all-false masks after minibatch 0), next to
    ``a3po/alpha``: the same keys on every rank whatever its shard, which AReaL's export over the
    data-parallel group needs. No host sync."""
    checked = fresh if minibatch == 0 else torch.zeros_like(fresh)
    gap = torch.where(checked, (behave_logp.float() - theta_logp.float()).abs(), 0.0)
    gap = torch.nan_to_num(gap, nan=0.0, posinf=0.0)  # a NaN/Inf log π_θ is raised after the minibatch
    stats_tracker.denominator(**{"tag_check/tokens": checked, "tag_check/suspect_tokens": checked & (gap > TAG_CHECK_GAP)})
    stats_tracker.stat(**{"tag_check/behave_gap": gap}, denominator="tag_check/tokens")


def audit_micro_batch(approx, truth, theta_logp, input_data, a3po, position, clip, tokens, d, step_audit) -> None:
    """``a3po/audit/*`` of one micro-batch: the active approximation, the other anchors, AReaL's
    ``loglinear`` and 2.0's ``reuse_train_logp`` against AReaL's recomputed π_prox; the active method's
    share of the step's totals (for the fallback)."""
    versions, behave_logp = input_data["versions"], input_data["logprobs"]
    others = {
        _anchor_key(other): interpolate(
            behave_logp, theta_logp,
            interpolation_weights(versions, anchor=other, loss_mask=tokens, **vars(position)),
            interpolation=a3po.interpolation,
        )
        for other in _other_anchors(a3po)
    }
    others[AREAL_REUSE_TRAIN_LOGP] = theta_logp
    areal_versions = input_data.get(AREAL_VERSIONS_KEY)
    if areal_versions is not None:
        # AReaL's built-in method, on its own (unaligned) versions as its loss would see them.
        others[AREAL_LOGLINEAR] = compute_prox_logp_approximations(
            old_logp=behave_logp.float(), logprobs=theta_logp.float(), versions=areal_versions,
            current_version=position.current_version, method="loglinear",
        )["loglinear"]
    record_audit(AuditInputs(
        approx=approx, others=others, truth=truth, behave=behave_logp, theta=theta_logp,
        advantages=input_data["advantages"], tokens=tokens, staleness=d, minibatch=position.minibatch,
        eps_clip=clip[0], eps_clip_higher=clip[1], staleness_limit=a3po.staleness_limit,
    ), step_audit)


def record_audit(inputs: AuditInputs, step_audit: StepAudit | None) -> None:
    """The audit of one micro-batch: ``a3po/audit/*`` logged, and the active method's share of the step's
    totals (for the fallback)."""
    report = audit_report(inputs)
    log_audit_report(report)
    if step_audit is not None:
        step_audit.totals.add(report.active, report.tokens)


def _other_anchors(a3po: A3POConfig) -> list[str]:
    return sorted(set(ANCHORS) - {a3po.anchor})


def _anchor_key(anchor: str) -> str:
    return f"anchor_{anchor}"


def log_empty_audit(a3po: A3POConfig, minibatch: int, device: torch.device) -> None:
    """The audit keys of ``minibatch`` with no token, for a rank where AReaL never called the loss in
    that minibatch (it skips micro-batches whose tokens are all masked): the keys a rank logs must
    not depend on its shard, or AReaL's stats export over the ranks does not pair up. On ``device``,
    the engine's (where the loss would have recorded them): AReaL reduces each key on the device it
    was recorded on, and NCCL refuses a CPU tensor."""
    zero, none = torch.zeros(1, device=device), torch.zeros(1, dtype=torch.bool, device=device)
    others = {**{_anchor_key(a): zero for a in _other_anchors(a3po)}, AREAL_REUSE_TRAIN_LOGP: zero, AREAL_LOGLINEAR: zero}
    inputs = AuditInputs(approx=zero, others=others, truth=zero, behave=zero, theta=zero, advantages=zero, tokens=none,
                         staleness=zero, minibatch=minibatch, eps_clip=0.2, staleness_limit=a3po.staleness_limit)
    with stats_tracker.scope("a3po"):
        log_audit_report(audit_report(inputs))


class A3POUpdateEngine:
    """The engine as ``PPOActor._ppo_update`` sees it during one A-3PO update (see the module docstring).

    Everything is the real engine's, except ``train_batch``, which numbers the minibatches, swaps
    AReaL's ``grpo_loss_fn`` partial for ``a3po_loss_fn`` with the same arguments and, after the
    minibatch, raises on every rank of the data-parallel group when the loss saw a NaN/Inf log π_θ or
    failed on any of them (one all-gather per minibatch; AReaL has skipped that optimizer step on a
    NaN). On an audited step, a minibatch in which AReaL never called the loss on this rank still logs
    its audit keys (``log_empty_audit``).
    """

    def __init__(self, engine: Any, a3po: A3POConfig, n_minibatches: int, step_audit: StepAudit):
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
                f"to train_batch, got {loss_fn!r}: AReaL {AREAL_VERSION}'s update is not the one the plugin hooks "
                f"into (tested: AReaL {' and '.join(TESTED_VERSIONS)})."
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
        minibatch, self._minibatch = self._minibatch, self._minibatch + 1
        calls = self._step_audit.loss_calls
        stats = self._engine.train_batch(input_, loss_fn=a3po_loss, loss_weight_fn=loss_weight_fn)
        if self._step_audit.audited and self._step_audit.loss_calls == calls:
            log_empty_audit(self._a3po, minibatch, self._engine.device)
        bad, error = self._step_audit.take_minibatch()
        group = getattr(self._engine, "data_parallel_group", None)
        counts = gather_rows([bad, int(error is not None)], group)
        raise_together(error, group, failed=bool(counts[:, 1].any()))
        if int(counts[:, 0].sum()):
            raise theta_error(int(counts[:, 0].sum()), minibatch)
        return stats
