"""A-3PO on AReaL's Megatron actor: importable where megatron-core and mbridge are installed (not tested in CI)."""

from areal.engine import MegatronPPOActor

from areal_a3po.actor import A3POActorMixin


class A3POMegatronActor(A3POActorMixin, MegatronPPOActor):
    """Drop-in for ``areal.engine.MegatronPPOActor`` with ``prox_logp_method: a3po``."""
