"""areal-a3po: A-3PO (arXiv 2512.06547) for AReaL 1.0.4, switched on by ``actor.prox_logp_method: a3po``.

The math (``approximate_prox_logp`` and its registries) imports only torch; the AReaL-facing names
are imported on first use, so ``from areal_a3po import approximate_prox_logp`` stays light.
"""

from areal_a3po import proximal
from areal_a3po.proximal import (
    ANCHORS,
    INTERPOLATIONS,
    Registry,
    approximate_prox_logp,
    interpolate,
    interpolation_weights,
    staleness,
)
from areal_a3po.audit import AUDIT_METRICS, AuditTotals, token_errors
from areal_a3po.fallback import FallbackState

__version__ = "0.1.0"

_LAZY = {
    "A3POConfig": "areal_a3po.config",
    "A3POConfigError": "areal_a3po.config",
    "FallbackConfig": "areal_a3po.config",
    "A3POActorConfig": "areal_a3po.config",
    "A3POGRPOConfig": "areal_a3po.config",
    "load_config": "areal_a3po.config",
    "A3POPPOActor": "areal_a3po.actor",
    "A3POFSDPActor": "areal_a3po.actor",
    "A3POActorMixin": "areal_a3po.actor",
    "a3po_loss_fn": "areal_a3po.actor",
    "A3POWarning": "areal_a3po.actor",
    "BatchCounts": "areal_a3po.batch",
    "validate_batch": "areal_a3po.batch",
    "A3POTrainer": "areal_a3po.trainer",
    "actor_engine_class": "areal_a3po.trainer",
}

__all__ = [*proximal.__all__, "AUDIT_METRICS", "AuditTotals", "FallbackState", "token_errors", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'areal_a3po' has no attribute {name!r}")
