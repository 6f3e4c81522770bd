"""The AReaL versions the plugin serves, what differs between them, and every private name it uses.

Tested: AReaL 1.0.4 (PyPI) and 2.0.0 (tag ``v2.0.0``, installed from source or its wheel). Another
version warns once at import (``UntestedAReaLWarning``), naming it and the tested ones.

What differs between the tested versions, and where the plugin copes (each in one place):

- ``actor.prox_logp_method``: 2.0 validates it against its ``ProxLogpMethod`` enum in
  ``PPOActorConfig.__post_init__`` and adds ``reuse_train_logp``. The methods come from AReaL
  (``areal_prox_logp_methods``); ``areal_a3po.config`` shows AReaL a value it knows while AReaL's
  own checks run (``STAND_IN_METHOD``).
- ``PPOActor._compute_advantages(data)`` takes a second argument in 2.0 (the batch's group sizes);
  ``areal_a3po.actor`` passes whatever AReaL passes on.
- ``reuse_train_logp`` (2.0 only) is π_θ of the loss's own forward, detached: the audit reports it on
  both versions (``areal_a3po.loss``).

AReaL's private names (a leading underscore, or a module global that is not API) that the plugin
reaches into are listed in ``PRIVATE_NAMES``, each with what the plugin needs it for. ``private``
returns one, and ``check_private_names`` checks them all at start-up, before any worker or server
starts: a name that is gone is an ``AReaLPrivateNameMissing`` naming AReaL's version, the name and its
use, not an ``AttributeError`` deep inside a run, or a workaround that silently stops working.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

__all__ = [
    "AREAL_VERSION",
    "PRIVATE_NAMES",
    "STAND_IN_METHOD",
    "TESTED_VERSIONS",
    "AReaLPrivateNameMissing",
    "PrivateName",
    "UntestedAReaLWarning",
    "areal_prox_logp_methods",
    "check_private_names",
    "private",
    "replaced",
]

#: The AReaL releases the test suite runs against (``make test``: 1.0.4; ``make test-areal``: 2.0.0).
TESTED_VERSIONS = ("1.0.4", "2.0.0")
AREAL_VERSION = metadata.version("areal")
#: What AReaL's own config checks are shown while ``prox_logp_method: a3po``: every AReaL version knows
#: it, 2.0's ``__post_init__`` changes nothing for it, and it is what the plugin hands AReaL's loss
#: (a given π_prox).
STAND_IN_METHOD = "recompute"


class UntestedAReaLWarning(UserWarning):
    """The installed AReaL is not one the plugin was tested with."""


class AReaLPrivateNameMissing(RuntimeError):
    """A private name of AReaL that the plugin needs is not in the installed AReaL."""


def _warn_if_untested() -> None:
    if AREAL_VERSION not in TESTED_VERSIONS:
        warnings.warn(
            f"areal-a3po was tested with AReaL {' and '.join(TESTED_VERSIONS)}; the installed AReaL is "
            f"{AREAL_VERSION}. It may work: every AReaL private name the plugin needs is checked when a run "
            "starts (areal_a3po.areal_compat.check_private_names). Run the plugin's tests against it: "
            "make test-areal AREAL=<your AReaL wheel or source folder>.",
            UntestedAReaLWarning,
            stacklevel=3,
        )


_warn_if_untested()


@dataclass(frozen=True)
class PrivateName:
    """``module``'s ``name`` (``Class.attribute`` for a class's), and what the plugin needs it for.

    ``instance``: the name is an attribute that ``Class.__init__`` sets on each instance (``Class.name``
    then stands for it); it is checked by ``__init__`` assigning it, and ``resolve`` returns the class."""

    module: str
    name: str
    use: str
    instance: bool = False

    def resolve(self) -> Any:
        try:
            value: Any = importlib.import_module(self.module)
            *owner, last = self.name.split(".")
            for part in owner:
                value = getattr(value, part)
            if not self.instance:
                return getattr(value, last)
            if last not in value.__init__.__code__.co_names:
                raise AttributeError(f"{value.__name__}.__init__ does not set {last}")
        except (ImportError, AttributeError) as exc:
            raise AReaLPrivateNameMissing(
                f"areal-a3po needs {self.module}.{self.name} of AReaL {AREAL_VERSION} to {self.use}, and it is "
                f"not there ({type(exc).__name__}: {exc}). The plugin was tested with AReaL "
                f"{' and '.join(TESTED_VERSIONS)}; install one of those (pip install areal==1.0.4, or AReaL's "
                "v2.0.0 tag from source), or report it with your AReaL version."
            ) from None
        return value


#: Every private name of AReaL the plugin reaches into, by a key of the plugin's own.
PRIVATE_NAMES = {
    "port stream": PrivateName(
        "areal.utils.network", "random",
        "give AReaL's free-port search a random stream of its own (areal_a3po.ports)"),
    "create train engine": PrivateName(
        "areal.trainer.rl_trainer", "PPOTrainer._create_train_engine",
        "build the plugin's actor engine instead of AReaL's (areal_a3po.trainer)"),
    "init rollout": PrivateName(
        "areal.trainer.rl_trainer", "PPOTrainer._init_rollout",
        "skip the evaluation rollout of a run without valid_dataset (areal_a3po.trainer)"),
    "trainer's vllm engine": PrivateName(
        "areal.trainer.rl_trainer", "RemotevLLMEngine",
        "hand AReaL the plugin's vLLM rollout engine (areal_a3po.rollout_engines)"),
    "trainer's sglang engine": PrivateName(
        "areal.trainer.rl_trainer", "RemoteSGLangEngine",
        "hand AReaL the plugin's SGLang rollout engine (areal_a3po.rollout_engines)"),
    "vllm engine's engine": PrivateName(
        "areal.engine.vllm_remote", "RemotevLLMEngine._engine",
        "put the plugin's RemoteInfEngine inside AReaL's vLLM engine (areal_a3po.rollout_engines)", instance=True),
    "sglang engine's engine": PrivateName(
        "areal.engine.sglang_remote", "RemoteSGLangEngine._engine",
        "put the plugin's RemoteInfEngine inside AReaL's SGLang engine (areal_a3po.rollout_engines)", instance=True),
    "wait for server": PrivateName(
        "areal.infra.remote_inf_engine", "RemoteInfEngine._wait_for_server",
        "end the wait for a server whose process exited (areal_a3po.rollout_engines)"),
    "trainer's data controller": PrivateName(
        "areal.trainer.rl_trainer", "DataController",
        "start AReaL's data service with the plugin's bounded wait (areal_a3po.trainer)"),
    "data service wait": PrivateName(
        "areal.infra.data_service.controller.controller", "DataController._WORKERS_READY_TIMEOUT",
        "let AReaL's data service wait train_dataset.setup_timeout for its worker (areal_a3po.trainer)"),
    "data service readiness": PrivateName(
        "areal.infra.data_service.controller.controller", "DataController._ensure_initialized",
        "name AReaL's data service when it is not up within train_dataset.setup_timeout (areal_a3po.trainer)"),
    "worker health": PrivateName(
        "areal.infra.scheduler.local", "LocalScheduler._check_worker_health",
        "name a trainer rank that died when another rank's error arrived first (areal_a3po.trainer)"),
    "workers": PrivateName(
        "areal.infra.scheduler.local", "LocalScheduler._workers",
        "name a trainer rank that died when another rank's error arrived first (areal_a3po.trainer)", instance=True),
    "group timeout": PrivateName(
        "areal.engine.fsdp_engine", "DIST_GROUP_DEFAULT_TIMEOUT",
        "bound the xccl weight-update group by actor.weight_update_group_timeout (areal_a3po.weight_sync)"),
    "push weights": PrivateName(
        "areal.engine.fsdp_engine", "FSDPEngine._update_weights_from_distributed",
        "name a weight push over the xccl group that failed (areal_a3po.weight_sync)"),
    "form weight group": PrivateName(
        "areal.engine.fsdp_engine", "FSDPEngine._init_weight_update_from_distributed",
        "bound the xccl weight-update group by actor.weight_update_group_timeout (areal_a3po.weight_sync)"),
    "compute advantages": PrivateName(
        "areal.trainer.ppo.actor", "PPOActor._compute_advantages",
        "label-align the per-token versions as AReaL aligns the logprobs (areal_a3po.actor)"),
    "ppo update": PrivateName(
        "areal.trainer.ppo.actor", "PPOActor._ppo_update",
        "put A-3PO's π_prox into AReaL's update (areal_a3po.actor)"),
    "compute logp": PrivateName(
        "areal.trainer.ppo.actor", "PPOActor._compute_logp",
        "run AReaL's recompute forward on audited steps and in the fallback (areal_a3po.actor)"),
    "log configuration": PrivateName(
        "areal.trainer.ppo.actor", "PPOActor._log_configuration",
        "log the A-3PO settings once, from rank 0 (areal_a3po.actor)"),
}


def private(key: str) -> Any:
    """The AReaL object behind ``PRIVATE_NAMES[key]``; ``AReaLPrivateNameMissing`` when it is gone."""
    return PRIVATE_NAMES[key].resolve()


@contextlib.contextmanager
def replaced(key: str, value: Any) -> Iterator[None]:
    """The module-level name ``PRIVATE_NAMES[key]`` is ``value`` inside the block, AReaL's after it (for
    a class that AReaL's code builds by that name, such as the trainer module's ``DataController``)."""
    entry = PRIVATE_NAMES[key]
    if entry.instance or "." in entry.name:
        raise ValueError(f"{key!r} is not a module-level name")
    before = entry.resolve()
    module = importlib.import_module(entry.module)
    setattr(module, entry.name, value)
    try:
        yield
    finally:
        setattr(module, entry.name, before)


def check_private_names() -> None:
    """Resolve every ``PRIVATE_NAMES`` entry; raise one ``AReaLPrivateNameMissing`` listing the missing ones."""
    missing = []
    for entry in PRIVATE_NAMES.values():
        try:
            entry.resolve()
        except AReaLPrivateNameMissing as exc:
            missing.append(str(exc))
    if missing:
        raise AReaLPrivateNameMissing("\n".join(missing))


def areal_prox_logp_methods() -> tuple[str, ...]:
    """AReaL's own ``actor.prox_logp_method`` values (1.0.4: recompute, loglinear, metrics; 2.0 adds
    reuse_train_logp)."""
    from areal.utils.constants import PROX_LOGP_METHODS_ALL

    return tuple(PROX_LOGP_METHODS_ALL)
