"""The variants the benchmarks compare, in one registry shared by the demo and every runner.

A variant is one way of obtaining π_prox for AReaL's decoupled PPO loss, named the same everywhere:

- ``recompute``: AReaL's default, an extra forward pass over the batch every step;
- ``areal-loglinear``: AReaL's built-in approximation (``prox_logp_method: loglinear``);
- ``a3po-paper``, ``a3po-recompute``: the plugin with ``anchor: paper`` or ``anchor: recompute``;
- ``sync (on-policy)``: AReaL's recompute on batches without staleness, a learning reference.

Each variant gives its settings in the two forms the runners need: ``actor_options()``, keyword
options of ``benchmarks.harness.actor.make_actor`` (in-process runs), and ``overrides()``, Hydra
overrides of ``python -m areal_a3po.train`` (real runs). ``apply(config)`` switches an existing
actor's config to the variant (one actor shared by all variants).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["COMPARED", "DEMO", "LEARNING", "REFERENCE", "VARIANTS", "Variant", "get"]


@dataclass(frozen=True)
class Variant:
    """One π_prox method and its settings."""

    name: str
    prox_logp_method: str  # AReaL's actor.prox_logp_method ("a3po" for the plugin)
    anchor: str | None = None  # actor.a3po.anchor, a3po only
    on_policy: bool = False  # every batch from the current weights (staleness 0)
    description: str = ""

    def __post_init__(self) -> None:
        if (self.anchor is not None) != self.a3po:
            raise ValueError(f"variant {self.name!r}: an anchor is for prox_logp_method 'a3po' only, and a3po needs one.")

    @property
    def a3po(self) -> bool:
        """Whether the plugin supplies π_prox (no recompute forward on plain steps)."""
        return self.prox_logp_method == "a3po"

    def actor_options(self) -> dict[str, Any]:
        """Keyword options of ``make_actor`` for this variant."""
        options: dict[str, Any] = {"prox_logp_method": self.prox_logp_method}
        if self.anchor is not None:
            options["anchor"] = self.anchor
        return options

    def overrides(self) -> list[str]:
        """Hydra overrides of ``python -m areal_a3po.train`` for this variant."""
        out = [f"actor.prox_logp_method={self.prox_logp_method}"]
        if self.anchor is not None:
            out.append(f"actor.a3po.anchor={self.anchor}")
        if self.on_policy:
            out.append("rollout.max_head_offpolicyness=0")
        return out

    def apply(self, config: Any) -> None:
        """Switch an actor's config (``actor.config``) to this variant in place; read by its next step."""
        config.prox_logp_method = self.prox_logp_method
        if hasattr(config, "a3po"):
            config.a3po.anchor = self.anchor or "paper"  # make_actor's default when the anchor is unused

    def staleness(self, max_staleness: int) -> int:
        """The largest staleness this variant's batches may have in a run allowing ``max_staleness``."""
        return 0 if self.on_policy else max_staleness


REFERENCE = "sync (on-policy)"

#: Every variant, by name.
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("recompute", "recompute", description="AReaL's recompute forward every step"),
        Variant("areal-loglinear", "loglinear", description="AReaL's built-in approximation"),
        Variant("a3po-paper", "a3po", "paper", description="A-3PO, the paper's anchor"),
        Variant("a3po-recompute", "a3po", "recompute", description="A-3PO, anchored at what recompute returns"),
        Variant(REFERENCE, "recompute", on_policy=True, description="recompute without staleness (reference)"),
    )
}

#: The step-time comparison (``benchmarks.step_time``), in its order.
COMPARED = ("recompute", "areal-loglinear", "a3po-paper", "a3po-recompute")
#: The demo's variants (``benchmarks.in_process``).
DEMO = ("recompute", "a3po-paper", "a3po-recompute")
#: ``benchmarks.learning``'s default methods (``--sync`` adds ``REFERENCE``).
LEARNING = ("recompute", "a3po-paper", "a3po-recompute", "areal-loglinear")


def get(name: str) -> Variant:
    """The variant ``name``; an unknown name is refused with the known ones."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; choose one of {list(VARIANTS)}.") from None
