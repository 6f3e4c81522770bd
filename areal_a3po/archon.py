"""A-3PO on AReaL's experimental Archon actor (imports on CPU; not trained in CI)."""

from areal.experimental.engine.archon_engine import ArchonPPOActor

from areal_a3po.actor import A3POActorMixin


class A3POArchonActor(A3POActorMixin, ArchonPPOActor):
    """Drop-in for ``areal.experimental.engine.archon_engine.ArchonPPOActor`` with ``prox_logp_method: a3po``."""
