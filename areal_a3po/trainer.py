"""``A3POTrainer``: AReaL's ``PPOTrainer`` that builds the plugin's actor engine.

The trainer already skips the recompute forward when ``config.actor.should_compute_prox_logp()``
is false, which ``A3POActorConfig`` answers for a3po. What it cannot know is our actor class: in
single-controller mode the workers import the engine class by ``module.name``, so it must be the
plugin's class (a patch in the driver would never reach them); in SPMD mode every rank runs this
code and builds it directly.

What else it guarantees:

- every AReaL private name the plugin uses is there before anything starts
  (``areal_compat.check_private_names``);
- AReaL's data service waits ``train_dataset.setup_timeout`` for its workers, not a fixed 30 s, and
  says so when they are late (``BoundedDataController``);
- a start that fails stops the workers AReaL started (AReaL leaves them running: there is no
  trainer to close yet) and ends with a named error where the plugin can name the cause
  (``failures.of_start``); an error during training is named before AReaL's teardown stops the
  servers (``failures.of_run``);
- the inference servers are watched during the run (``areal_a3po.server_watch``,
  ``rollout.server_health_timeout``); the processes the run starts are recorded
  (``started_processes``), so that the entry point can stop those that leave the process tree.
"""

from __future__ import annotations

import importlib
from typing import Any

from areal.api.cli_args import PPOActorConfig
from areal.infra.data_service.controller.controller import DataController
from areal.trainer import PPOTrainer
from areal.utils import logging
from areal.utils.environ import is_single_controller

from areal_a3po import failures, processes
from areal_a3po.areal_compat import check_private_names, replaced
from areal_a3po.config import A3PO, A3POActorConfig
from areal_a3po.server_watch import ServerWatch
from areal_a3po.servers import server_kind
from areal_a3po.weight_sync import server_addresses

logger = logging.getLogger("A3PO")

#: backend of ``actor.backend`` (e.g. ``fsdp:d4``) → "module:Class" of the plugin's actor engine.
ACTOR_ENGINES = {
    "fsdp": "areal_a3po.actor:A3POFSDPActor",
    "megatron": "areal_a3po.megatron:A3POMegatronActor",
    "archon": "areal_a3po.archon:A3POArchonActor",
}


def actor_engine_class(backend: str) -> type:
    """The plugin's actor engine class for an AReaL backend name (``fsdp``, ``megatron``, ``archon``)."""
    if backend not in ACTOR_ENGINES:
        raise ValueError(f"actor.backend {backend!r}: areal-a3po supports {sorted(ACTOR_ENGINES)}.")
    module, name = ACTOR_ENGINES[backend].split(":")
    return getattr(importlib.import_module(module), name)


class BoundedDataController(DataController):
    """AReaL's ``DataController`` that waits ``setup_timeout`` (``train_dataset.setup_timeout``) for its
    first worker, and raises ``failures.DataServiceLate`` naming that key when its workers are late.

    AReaL (1.0.4, 2.0.0) is wrong for us here: ``DataController.initialize`` waits a hard-coded 30 s
    (``_WORKERS_READY_TIMEOUT``) for that worker, whatever ``train_dataset.setup_timeout`` (whose help
    is about this data service) says; a fresh process importing torch and AReaL can take longer on a
    busy machine. The rest of the service (a forked data worker, router and gateway) gets
    ``setup_timeout`` from AReaL already; its wait ends in a bare ``TimeoutError``."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        self._WORKERS_READY_TIMEOUT = float(config.setup_timeout)

    def initialize(self, *args: Any, **kwargs: Any):
        try:
            return super().initialize(*args, **kwargs)
        except TimeoutError as exc:
            raise self._late(f"AReaL's data service worker (it loads train_dataset) did not start ({exc})") from exc

    def _ensure_initialized(self) -> None:
        try:
            super()._ensure_initialized()
        except TimeoutError as exc:
            raise self._late("AReaL's data service (the workers that load train_dataset) did not finish starting") from exc

    def _late(self, what: str) -> failures.DataServiceLate:
        return failures.DataServiceLate(
            f"{what} within train_dataset.setup_timeout={self.config.setup_timeout:g} s. On a slow or busy machine "
            "raise train_dataset.setup_timeout; the data service's logs are data-*.log in AReaL's log folder.")


class A3POTrainer(PPOTrainer):
    """``PPOTrainer`` whose actor is the plugin's (``A3POFSDPActor`` for ``fsdp``); ref/critic stay AReaL's."""

    def __init__(self, config, *args, **kwargs):
        actor = config.actor
        if not isinstance(actor, A3POActorConfig) and getattr(actor, "prox_logp_method", None) == A3PO:
            raise TypeError(
                "actor.prox_logp_method=a3po but the config was not loaded with areal-a3po's classes; "
                "load it with areal_a3po.load_config(argv) (or load_expr_config(argv, A3POGRPOConfig))."
            )
        check_private_names()
        self.server_watch = None
        try:
            with replaced("trainer's data controller", BoundedDataController):
                super().__init__(config, *args, **kwargs)
        except BaseException as exc:
            self._stop_workers()
            failure = failures.of_start(exc, config, server_addresses(getattr(self, "rollout", None)))
            if failure is not None:
                raise failure from exc
            raise
        self.started_processes = processes.descendants()
        self.server_watch = self._watch_servers(config)

    def _stop_workers(self) -> None:
        scheduler = getattr(self, "scheduler", None)
        if scheduler is None:
            return
        try:
            scheduler.delete_workers()
        except Exception as cleanup_error:  # keep the original error; the entry point still stops what is left
            logger.warning("could not stop AReaL's workers after a failed start: %s", cleanup_error)

    def _watch_servers(self, config) -> ServerWatch | None:
        """``ServerWatch`` on the rollout's servers (and the evaluation rollout's), unless
        ``rollout.server_health_timeout`` is 0 or no server address is known here."""
        timeout = float(getattr(config.rollout, "server_health_timeout", 0) or 0)
        addresses = [a for r in (self.rollout, getattr(self, "eval_rollout", None)) for a in (server_addresses(r) or [])]
        if timeout <= 0 or not addresses:
            return None
        return ServerWatch(addresses, timeout, probe_path=server_kind(config.rollout.backend).probe_path,
                           single_controller=is_single_controller()).start()

    def __exit__(self, exc_type, exc_value, traceback):
        if self.server_watch is not None:
            self.server_watch.stop()  # the run is ending: no more interrupts from the watch
        # Named before AReaL's close stops the servers (a server that died while the trainer pushed
        # weights to it fails the push before the watch's timeout).
        failure = None
        if isinstance(exc_value, Exception):
            failure = failures.of_run(exc_value, getattr(self, "scheduler", None), self.server_watch)
        super().__exit__(exc_type, exc_value, traceback)
        if failure is not None and failure is not exc_value:
            raise failure from exc_value
        return False

    def close(self):
        """AReaL's close, after the server watch has stopped (the servers are stopped on purpose now)."""
        if self.server_watch is not None:
            self.server_watch.stop()
        super().close()

    def actor_engine_class(self, backend: str) -> type:
        """The actor engine class for ``backend`` (``ACTOR_ENGINES``); a subclass may pick its own."""
        return actor_engine_class(backend)

    def _init_rollout(self, rollout_config, is_eval: bool = False, **kwargs):
        # AReaL (1.0.4, 2.0.0) starts an evaluation rollout worker in every run, also when the experiment
        # has no valid_dataset and so nothing to evaluate (its evaluate() needs both). It costs a worker
        # start and stop (about 12 s on a 2-core machine) and a process for the whole run; skip it.
        if is_eval and self.config.valid_dataset is None:
            return None
        # AReaL picks RemotevLLMEngine or RemoteSGLangEngine by those names in this method (its workers
        # import the class by path): the plugin's subclasses (areal_a3po.rollout_engines).
        from areal_a3po.rollout_engines import A3POSGLangEngine, A3POvLLMEngine

        with replaced("trainer's vllm engine", A3POvLLMEngine), replaced("trainer's sglang engine", A3POSGLangEngine):
            return super()._init_rollout(rollout_config, is_eval=is_eval, **kwargs)

    def _create_train_engine(self, actor_config: PPOActorConfig, alloc):
        if not isinstance(actor_config, A3POActorConfig):  # the reference model, or a plain config
            return super()._create_train_engine(actor_config, alloc)
        # PPOTrainer._create_train_engine of AReaL 1.0.4 and 2.0.0, line for line, with the plugin's class.
        actor_cls = self.actor_engine_class(alloc.backend)
        if is_single_controller():
            actor = actor_cls.as_controller(actor_config, self.scheduler)
        else:
            actor = actor_cls(config=actor_config)
        actor.create_process_group(parallel_strategy=alloc.parallel)
        return actor

