"""The automatic fallback: approximate π_prox until audits say it is bad, then recompute it.

One small state machine, no torch or AReaL import. Every audited step feeds it one value (an audit
metric, reduced across ranks so every rank decides alike):

    approximate --[value > threshold on `patience` audits in a row]--> recompute
    recompute   --[value ≤ threshold on `recover_after` audits in a row]--> approximate   (0: never)

NaN counts as over the threshold. In ``recompute`` mode every step is audited, because the forward
runs anyway and the approximation is a few element-wise ops. The state is a small dict
(``state_dict``/``load_state_dict``), stored with AReaL's checkpoints so a resumed run goes on in the
mode it was in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["APPROXIMATE", "RECOMPUTE", "FallbackState", "Transition"]

APPROXIMATE = "approximate"
RECOMPUTE = "recompute"


@dataclass(frozen=True)
class Transition:
    """A change of mode, with what caused it."""

    step: int
    mode: str  # the new mode
    metric: str
    value: float
    threshold: float
    streak: int

    def message(self) -> str:
        if self.mode == RECOMPUTE:
            return (
                f"A-3PO fallback at step {self.step}: audited {self.metric}={self.value:.4g} exceeded "
                f"actor.a3po.fallback.threshold={self.threshold:g} on {self.streak} audit(s) in a row; "
                "π_prox is now recomputed exactly (one forward per step) until audits are clean."
            )
        return (
            f"A-3PO recovered at step {self.step}: audited {self.metric}={self.value:.4g} ≤ "
            f"threshold {self.threshold:g} on {self.streak} step(s) in a row; back to the approximation."
        )


@dataclass
class FallbackState:
    """Mode of the A-3PO actor: ``approximate`` or ``recompute`` (after too many bad audits)."""

    metric: str = "abs_error"
    threshold: float | None = None  # None: fallback off, always approximate
    patience: int = 1
    recover_after: int = 0
    mode: str = APPROXIMATE
    bad_streak: int = 0
    clean_streak: int = 0
    transitions: list[dict] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.threshold is not None

    @property
    def recomputing(self) -> bool:
        """In recompute mode and enabled: a run resumed with the fallback turned off approximates."""
        return self.enabled and self.mode == RECOMPUTE

    def observe(self, value: float, step: int) -> Transition | None:
        """Feed one audited value; returns the transition when the mode changes."""
        if not self.enabled:
            return None
        bad = math.isnan(value) or value > self.threshold
        if self.mode == APPROXIMATE:
            self.bad_streak = self.bad_streak + 1 if bad else 0
            if self.bad_streak >= self.patience:
                return self._switch(RECOMPUTE, step, value, self.bad_streak)
        else:
            self.clean_streak = 0 if bad else self.clean_streak + 1
            if self.recover_after > 0 and self.clean_streak >= self.recover_after:
                return self._switch(APPROXIMATE, step, value, self.clean_streak)
        return None

    def _switch(self, mode: str, step: int, value: float, streak: int) -> Transition:
        self.mode, self.bad_streak, self.clean_streak = mode, 0, 0
        t = Transition(step, mode, self.metric, value, float(self.threshold), streak)
        self.transitions.append({"step": step, "mode": mode, "value": value})
        return t

    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "bad_streak": self.bad_streak,
            "clean_streak": self.clean_streak,
            "transitions": list(self.transitions),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") not in (APPROXIMATE, RECOMPUTE):
            raise ValueError(f"A-3PO fallback state has mode={state.get('mode')!r}; expected {APPROXIMATE!r} or {RECOMPUTE!r}.")
        self.mode = state["mode"]
        self.bad_streak = int(state.get("bad_streak", 0))
        self.clean_streak = int(state.get("clean_streak", 0))
        self.transitions = list(state.get("transitions", []))
