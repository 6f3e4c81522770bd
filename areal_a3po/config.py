"""Configuration: ``actor.prox_logp_method: a3po`` and the ``actor.a3po`` block.

``A3POConfig`` holds the plugin's options; ``A3POActorConfig`` adds it to AReaL's
``PPOActorConfig``; ``A3POGRPOConfig`` is AReaL's ``GRPOConfig`` with that actor. The whole
experiment is validated when it loads (``load_config``), every problem reported at once with the
full YAML key, the bad value and the fix.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields

from areal.api.cli_args import GRPOConfig, InferenceEngineConfig, PPOActorConfig, load_expr_config

from areal_a3po.areal_compat import STAND_IN_METHOD, areal_prox_logp_methods
from areal_a3po.audit import AUDIT_METRICS
from areal_a3po.ports import use_private_port_stream
from areal_a3po.proximal import ANCHORS, INTERPOLATIONS
from areal_a3po.server_watch import DEFAULT_HEALTH_TIMEOUT, HEALTH_KEY
from areal_a3po.weight_sync import DEFAULT_GROUP_TIMEOUT

# Every process that reads the experiment's config (the controller, each AReaL worker) imports this
# module before it picks a port: from here on those ports differ between runs (areal_a3po.ports).
use_private_port_stream()

A3PO = "a3po"
#: AReaL's own methods keep their meaning (1.0.4: recompute, loglinear, metrics; 2.0 adds
#: reuse_train_logp); ``a3po`` is added next to them.
PROX_LOGP_METHODS = (*areal_prox_logp_methods(), A3PO)
#: The audit's last staleness bucket of its own when ``max_staleness`` is null and no rollout config
#: filled it in (an actor built on its own): ``staleness_0`` … ``staleness_8``, ``staleness_gt_8``.
DEFAULT_STALENESS_LIMIT = 8


class A3POConfigError(ValueError):
    """An invalid experiment config: the A-3PO settings (every problem at once, each naming its YAML
    key and the fix), or what Hydra/OmegaConf refused while loading it (unknown key, wrong type)."""

    def __init__(self, problems: list[str], what: str = "A-3PO configuration"):
        self.problems = list(problems)
        self.what = what
        super().__init__(f"invalid {what}:\n  - " + "\n  - ".join(self.problems))


@dataclass
class FallbackConfig:
    """``actor.a3po.fallback``: switch to exact recompute when audits say the approximation is bad."""

    metric: str = field(
        default="abs_error",
        metadata={
            "help": "Audit metric compared with the threshold (token mean over all ranks, or the max): "
            + ", ".join(AUDIT_METRICS) + ".",
            "choices": list(AUDIT_METRICS),
        },
    )
    threshold: float | None = field(
        default=None,
        metadata={"help": "Fall back when the audited metric exceeds this; null (default) turns the fallback off."},
    )
    patience: int = field(
        default=1, metadata={"help": "Number of consecutive audits over the threshold before switching to recompute."}
    )
    recover_after: int = field(
        default=0,
        metadata={
            "help": "Return to the approximation after this many consecutive clean audited steps "
            "(every step is audited while recomputing); 0 = stay on recompute."
        },
    )

    @property
    def enabled(self) -> bool:
        return self.threshold is not None

    def problems(self, prefix: str = "actor.a3po.fallback") -> list[str]:
        out = []
        if self.metric not in AUDIT_METRICS:
            out.append(f"{prefix}.metric={self.metric!r} is not an audit metric; set one of {list(AUDIT_METRICS)}.")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float)) and 0 <= self.threshold < float("inf")):
            out.append(f"{prefix}.threshold={self.threshold!r} must be a finite number ≥ 0 (or null to turn the fallback off).")
        if not (isinstance(self.patience, int) and self.patience >= 1):
            out.append(f"{prefix}.patience={self.patience!r} must be an integer ≥ 1.")
        if not (isinstance(self.recover_after, int) and self.recover_after >= 0):
            out.append(f"{prefix}.recover_after={self.recover_after!r} must be an integer ≥ 0 (0 = never return).")
        return out


@dataclass
class A3POConfig:
    """Options of A-3PO (arXiv 2512.06547), read when ``actor.prox_logp_method: a3po``."""

    anchor: str = field(
        default="paper",
        metadata={
            "help": "Which version π_prox stands for. 'paper': the paper's A-3PO, with d = k − v, "
            "log π_prox = (1/d)·log π_behave + (1 − 1/d)·log π_θ (d ≥ 1), π_θ for d = 0. "
            "'recompute': calibrated to AReaL's recompute (π at trainer version k): weight "
            "(k − v)/(k + j/n − v) on π_θ in minibatch j of n; exact with ppo_n_minibatches=1.",
            "choices": ["paper", "recompute"],
        },
    )
    interpolation: str = field(
        default="loglinear",
        metadata={
            "help": "How π_behave and π_θ are mixed. 'loglinear': in log space (geometric, the "
            "paper's form). 'linear': in probability space (arithmetic).",
            "choices": ["loglinear", "linear"],
        },
    )
    audit_interval: int = field(
        default=0,
        metadata={
            "help": "Every N-th training step (trainer version % N == 0), also run AReaL's recompute forward "
            "and log the approximation's error under a3po/audit/*; training still uses the approximation. "
            "0 = off. Costs one forward every N steps."
        },
    )
    fallback: FallbackConfig = field(
        default_factory=FallbackConfig,
        metadata={"help": "Automatic switch to exact recompute on bad audits (needs audit_interval > 0)."},
    )
    max_staleness: int | None = field(
        default=None,
        metadata={
            "help": "Warn once when a token is staler than this many versions; null = "
            "rollout.max_head_offpolicyness (filled in when the experiment config loads). Also the audit's "
            "last staleness bucket of its own (audit/staleness_0 … staleness_<S>, staleness_gt_<S>)."
        },
    )

    @property
    def staleness_limit(self) -> int:
        """S of the audit's staleness buckets (``staleness_0`` … ``staleness_<S>``, ``staleness_gt_<S>``)."""
        return DEFAULT_STALENESS_LIMIT if self.max_staleness is None else self.max_staleness

    def problems(self, prefix: str = "actor.a3po") -> list[str]:
        """Every invalid field, as messages naming ``prefix.<field>``."""
        out = []
        if not (isinstance(self.audit_interval, int) and self.audit_interval >= 0):
            out.append(f"{prefix}.audit_interval={self.audit_interval!r} must be an integer ≥ 0 (0 = no audits).")
        out.extend(self.fallback.problems(f"{prefix}.fallback"))
        if self.fallback.enabled and self.audit_interval == 0:
            out.append(
                f"{prefix}.fallback.threshold is set but {prefix}.audit_interval=0, so nothing is ever audited; "
                f"set {prefix}.audit_interval to N > 0 (audit every N-th step) or {prefix}.fallback.threshold=null."
            )
        if self.max_staleness is not None and not (isinstance(self.max_staleness, int) and self.max_staleness >= 0):
            out.append(f"{prefix}.max_staleness={self.max_staleness!r} must be an integer ≥ 0 or null.")
        if self.anchor not in ANCHORS:
            out.append(f"{prefix}.anchor={self.anchor!r} is not an anchor; set one of {sorted(ANCHORS)}.")
        if self.interpolation not in INTERPOLATIONS:
            out.append(
                f"{prefix}.interpolation={self.interpolation!r} is not an interpolation; "
                f"set one of {sorted(INTERPOLATIONS)}."
            )
        return out


def _prox_logp_method_field():
    # AReaL's field with 'a3po' added to its choices and help; the default stays 'recompute'.
    base = next(f for f in fields(PPOActorConfig) if f.name == "prox_logp_method")
    help_text = base.metadata.get("help", "") + " 'a3po': A-3PO's staleness-aware approximation (areal-a3po; skip the forward pass)."
    return field(default=base.default, metadata={**base.metadata, "help": help_text, "choices": list(PROX_LOGP_METHODS)})


def _pipeline_stages(backend: str | None) -> int:
    """Pipeline stages of an ``actor.backend`` such as ``megatron:d2p2t1`` (1 when there is none or it does not parse:
    AReaL names a backend it cannot parse itself)."""
    if not backend:
        return 1
    from areal.api.alloc_mode import ModelAllocation

    try:
        return ModelAllocation.from_str(backend).parallel.pipeline_parallel_size
    except Exception:  # noqa: BLE001 - AReaL's own check reports a malformed backend
        return 1


@dataclass
class A3POActorConfig(PPOActorConfig):
    """AReaL's ``PPOActorConfig`` plus ``prox_logp_method: a3po`` and the ``a3po`` block."""

    prox_logp_method: str = _prox_logp_method_field()
    a3po: A3POConfig = field(
        default_factory=A3POConfig,
        metadata={"help": "A-3PO options; used when prox_logp_method is 'a3po'."},
    )
    weight_update_group_timeout: float = field(
        default=DEFAULT_GROUP_TIMEOUT,
        metadata={
            "help": "Seconds the xccl weight-update group may take to form (every inference server joining "
            "the trainer's rendezvous), and each weight broadcast on it; past it the run stops with an error "
            "naming the servers. AReaL 1.0.4 waits 7200 s. Any prox_logp_method; only weight_update_mode=xccl."
        },
    )

    @property
    def a3po_enabled(self) -> bool:
        """True when the decoupled loss takes π_prox from A-3PO."""
        return self.use_decoupled_loss and self.prox_logp_method == A3PO

    def should_compute_prox_logp(self) -> bool:
        """No recompute forward when A-3PO supplies π_prox; AReaL's rule otherwise."""
        if self.a3po_enabled:
            return False
        return super().should_compute_prox_logp()

    def a3po_problems(self) -> list[str]:
        """Every invalid A-3PO-related setting, with the full YAML key and the fix."""
        out = []
        if self.prox_logp_method not in PROX_LOGP_METHODS:
            out.append(
                f"actor.prox_logp_method={self.prox_logp_method!r} is unknown; set one of {list(PROX_LOGP_METHODS)}."
            )
        if self.prox_logp_method == A3PO:
            if not self.use_decoupled_loss:
                out.append(
                    "actor.prox_logp_method=a3po needs the decoupled loss; set actor.use_decoupled_loss=true "
                    "(A-3PO approximates the proximal policy, which only the decoupled loss uses)."
                )
            if self.use_sapo_loss:
                out.append(
                    "actor.prox_logp_method=a3po cannot be combined with actor.use_sapo_loss=true "
                    "(SAPO has no proximal policy); set actor.use_sapo_loss=false."
                )
            stages = _pipeline_stages(self.backend)
            if stages > 1:
                out.append(
                    f"actor.backend={self.backend!r}: actor.prox_logp_method=a3po does not support pipeline "
                    f"parallelism yet (p{stages}): the loss runs on the last stage only, so the other stages' audit "
                    "and fallback would decide on no tokens and their recompute forward would run on some stages "
                    "only. Use p1 (more d or t instead), or actor.prox_logp_method=recompute."
                )
            out.extend(self.a3po.problems("actor.a3po"))
        return out

    def __post_init__(self):
        problems = self.a3po_problems()
        timeout = self.weight_update_group_timeout
        if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0):
            problems.append(
                f"actor.weight_update_group_timeout={self.weight_update_group_timeout!r} must be a number of seconds "
                f"> 0 (default {DEFAULT_GROUP_TIMEOUT:g}; AReaL's own wait is 7200)."
            )
        if problems:
            raise A3POConfigError(problems)
        if self.prox_logp_method != A3PO:
            if self.a3po != A3POConfig():
                warnings.warn(
                    f"actor.a3po is set ({self.a3po}) but actor.prox_logp_method={self.prox_logp_method!r}, "
                    "so it is ignored; set actor.prox_logp_method=a3po to use it.",
                    UserWarning,
                    stacklevel=2,
                )
            super().__post_init__()
            return
        # AReaL 2.0 checks prox_logp_method against its ProxLogpMethod enum here, which has no 'a3po'.
        # Its checks see a method every AReaL knows; every AReaL code path that reads the field later
        # is the plugin's (should_compute_prox_logp, the loss) or only logs it.
        self.prox_logp_method = STAND_IN_METHOD
        try:
            super().__post_init__()
        finally:
            self.prox_logp_method = A3PO




@dataclass
class A3POInferenceEngineConfig(InferenceEngineConfig):
    """AReaL's ``InferenceEngineConfig`` (the ``rollout`` block) plus ``server_health_timeout``."""

    server_health_timeout: float = field(
        default=DEFAULT_HEALTH_TIMEOUT,
        metadata={
            "help": "Seconds an inference server may go without answering (vLLM: /health, SGLang: /server_info; "
            "refused, no answer, a 5xx) during the run before the run stops with an error naming it (exit 1, the "
            "run's processes stopped). AReaL (1.0.4, 2.0.0) does not notice a dead server: its trainer waits for "
            "rollouts for ever. 0 = no watch."
        },
    )

    def __post_init__(self):
        value = self.server_health_timeout
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
            raise A3POConfigError(
                [f"{HEALTH_KEY}={value!r} must be a number of seconds ≥ 0 (0 = no watch; default {DEFAULT_HEALTH_TIMEOUT:g})."],
                what="experiment configuration",
            )
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()


@dataclass
class A3POGRPOConfig(GRPOConfig):
    """AReaL's ``GRPOConfig`` whose ``actor`` understands ``prox_logp_method: a3po`` and whose ``rollout``
    has ``server_health_timeout``."""

    actor: A3POActorConfig = field(default_factory=A3POActorConfig)
    rollout: A3POInferenceEngineConfig = field(default_factory=A3POInferenceEngineConfig)

    def __post_init__(self):
        super().__post_init__()
        # The actor warns about tokens staler than the rollout allows; it only sees its own config.
        if self.actor.a3po_enabled and self.actor.a3po.max_staleness is None and self.rollout is not None:
            self.actor.a3po.max_staleness = self.rollout.max_head_offpolicyness


def load_config(argv: list[str], config_cls: type = A3POGRPOConfig):
    """Drop-in for ``areal.api.cli_args.load_expr_config(argv, GRPOConfig)``.

    Merges ``--config FILE.yaml`` with Hydra overrides (``actor.a3po.anchor=recompute``) into
    ``config_cls`` and validates it. Returns ``(config, config_file)`` as AReaL does.
    """
    try:
        return load_expr_config(argv, config_cls)
    except Exception as exc:  # OmegaConf wraps errors raised in __post_init__
        cause = exc
        while cause is not None and not isinstance(cause, A3POConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise A3POConfigError(cause.problems, what=cause.what) from None
        problem = _loading_problem(exc)
        if problem is None:
            raise
        raise A3POConfigError([problem], what="experiment configuration") from None


def _loading_problem(exc: Exception) -> str | None:
    """What Hydra/OmegaConf (or AReaL's loader) refused, in one line with its reason; None for anything else."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, AssertionError) and str(exc).startswith("Config file"):  # AReaL's check of --config
        return f"{exc} Pass an existing YAML with --config."
    if not isinstance(exc, (HydraException, OmegaConfBaseException)):
        return None
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons, cause = [], exc.__cause__ or exc.__context__
    while cause is not None:
        first = str(cause).splitlines()[0].strip() if str(cause).strip() else ""
        if first and first not in lines and first not in reasons:
            reasons.append(first)
        cause = cause.__cause__ or cause.__context__
    return " ".join(lines + [f"({r})" for r in reasons])
