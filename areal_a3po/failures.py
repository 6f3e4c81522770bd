"""Why a run stopped, in one line: the named errors a failed run ends with, and the one place that finds them.

A run can fail far from its cause: a trainer rank's error reaches the controller as an RPC error, a
dead inference server shows as a weight push that failed, a dead trainer rank as its peer's
"Connection closed by peer". ``of_start`` (a failed ``PPOTrainer.__init__``) and ``of_run`` (an error
while training, asked before AReaL's teardown stops the servers) turn what AReaL raised into one of
the ``RunFailure`` types below, by the types in its cause chain, or return None when the plugin cannot
name it (the entry point then prints AReaL's traceback).

Every ``RunFailure`` message says what stopped, where its log is and what to do; ``resumable`` says
whether a recover checkpoint can pick the run up (not when it never started).
"""

from __future__ import annotations

import os
import re
from typing import Any

__all__ = [
    "DataServiceLate",
    "RunFailure",
    "ServerLaunchError",
    "ServerNotAnswering",
    "WorkerLost",
    "find_cause",
    "of_run",
    "of_start",
]


class RunFailure(RuntimeError):
    """A run that stopped for a cause the plugin names."""

    #: Whether running the same command again can resume from a recover checkpoint.
    resumable = True


class ServerLaunchError(RunFailure):
    """The rollout's inference server did not come up within ``rollout.setup_timeout``."""

    resumable = False


class WorkerLost(RunFailure):
    """One of AReaL's workers (a trainer rank, a rollout worker and its server) died during the run."""


class ServerNotAnswering(RunFailure):
    """The run failed while an inference server was not answering (a weight push to a dead server, say)."""


class DataServiceLate(RunFailure):
    """AReaL's data service (the workers that load ``train_dataset``) was not up within
    ``train_dataset.setup_timeout``."""

    resumable = False


def find_cause(exc: BaseException | None, cls: type) -> BaseException | None:
    """The first error of type ``cls`` in ``exc``'s chain (``exc``, its cause or context, …); None."""
    while exc is not None and not isinstance(exc, cls):
        exc = exc.__cause__ or exc.__context__
    return exc


def of_start(exc: BaseException, config: Any, servers: list[str] | None) -> RunFailure | None:
    """The named failure of a ``PPOTrainer.__init__`` that raised ``exc``; None when it has no name here.

    - AReaL's RPC call ``launch_server`` failed (``EngineCallError.method``): the server did not come up;
    - a trainer rank's ``WeightSyncError``, whose text AReaL's RPC carries to the controller
      (``weight_sync.from_rpc_error``, completed with the servers' addresses, which only the
      controller knows);
    - ``DataServiceLate`` as the trainer's data controller raised it."""
    from areal.infra.scheduler.exceptions import EngineCallError

    from areal_a3po.weight_sync import from_rpc_error

    named = find_cause(exc, RunFailure)
    if named is not None:
        return named
    call = find_cause(exc, EngineCallError)
    if call is not None and call.method == "launch_server":
        return ServerLaunchError(_server_launch_message(config, call))
    failure = from_rpc_error(exc, servers)
    if failure is not None:
        reason = server_log_reason(rollout_log(config))
        if reason:
            failure = type(failure)(f"{failure} The server's log ends with: {reason}")
    return failure


#: A traceback's last line (``RuntimeError: Not enough memory ...``), a line logged at ERROR, or one that
#: says what failed and why (SGLang's ``Failed to initialize custom process group: <reason>``).
_REASON = re.compile(r"^[\w.]*(?:Error|Exception)\b[^:\s]*: .+$|\b(?:ERROR|[Ee]rror|[Ff]ailed)\b.*?: .+$")
#: Lines that are not the server's own: AReaL's log lines (its RPC reports the failure it saw) and the
#: plugin's.
_NOT_THE_SERVERS = ("(AReaL)", "areal_a3po", "Engine method ")


def rollout_log(config: Any) -> str:
    """The log of the rollout workers and the servers they launched (AReaL's ``rollout.log``)."""
    from areal.utils.stats_logger import StatsLogger

    return os.path.join(StatsLogger.get_log_path(config.stats_logger), "rollout.log")


def server_log_reason(path: str, lines: int = 400) -> str | None:
    """The server's own reason in its log: the last line among the last ``lines`` lines of ``path`` that is
    a traceback's last line (``RuntimeError: Not enough memory...``), logged at ERROR, or says what failed
    and why, leaving out AReaL's and the plugin's own lines; None when there is none (or no log)."""
    try:
        with open(path, errors="replace") as f:
            tail = [_strip_ansi(line).strip() for line in f.readlines()[-lines:]]
    except OSError:
        return None
    found = [line for line in tail if _REASON.search(line) and not any(mark in line for mark in _NOT_THE_SERVERS)]
    return found[-1][:400] if found else None


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def of_run(exc: BaseException, scheduler: Any, watch: Any) -> RunFailure | None:
    """The named failure of an error during training; call it before AReaL's teardown stops the servers.

    In this order: an error already named; AReaL's ``WorkerFailedError`` in the chain (a worker died);
    a worker whose process has ended although the error that arrived first is another rank's (a dead
    trainer rank's peer fails with "Connection closed by peer" first); an inference server that is not
    answering ``watch`` now (a weight push to a server that died fails before the watch's timeout); a
    trainer rank's ``WeightSyncError`` (a push that failed to a server that answers)."""
    from areal.infra.scheduler.exceptions import WorkerFailedError

    from areal_a3po.weight_sync import from_rpc_error

    named = find_cause(exc, RunFailure)
    if named is not None:
        return named
    lost = find_cause(exc, WorkerFailedError) or dead_worker(scheduler)
    if lost is not None:
        return WorkerLost(_worker_message(lost))
    down = watch.check() if watch is not None and watch.lost is None else None
    if down is not None:
        address, _, problem = down.partition(": ")
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return ServerNotAnswering(
            f"the inference server at {address} is not answering ({problem}); the run stopped at: {first}. "
            "Its log is rollout.log in AReaL's log folder.")
    return from_rpc_error(exc, watch.addresses if watch is not None else None)


def dead_worker(scheduler: Any, wait: float = 3.0, interval: float = 0.25) -> BaseException | None:
    """AReaL's ``WorkerFailedError`` for the first of ``scheduler``'s workers whose process has ended,
    checking for up to ``wait`` seconds (a killed worker's shell takes a moment to exit); None when all
    are alive, or for a scheduler that cannot tell (AReaL's local scheduler can: its
    ``_check_worker_health(role)`` is what its own calls run before each attempt; Ray's has none)."""
    import time

    from areal.infra.scheduler.exceptions import WorkerFailedError
    from areal.infra.scheduler.local import LocalScheduler

    from areal_a3po.areal_compat import private

    if not isinstance(scheduler, LocalScheduler):
        return None
    private("workers")  # named error if this AReaL's scheduler keeps its workers elsewhere
    check, roles = private("worker health"), list(getattr(scheduler, "_workers"))
    deadline = time.monotonic() + wait
    while roles:
        for role in roles:
            try:
                check(scheduler, role)
            except WorkerFailedError as exc:
                return exc
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    return None


def _worker_message(exc: BaseException) -> str:
    """What AReaL's ``WorkerFailedError`` (a worker process died: killed, out of memory, …) means, naming
    the trainer rank. AReaL reports the exit code of the shell around the worker, which is 0 even when
    the worker was killed, so the code is not repeated."""
    role, _, index = str(exc.worker_id).partition("/")
    what = {"actor": f"trainer rank {index}", "rollout": f"rollout worker {index} (and its inference server)"}.get(role, "a worker")
    return f"{what} (AReaL worker {exc.worker_id!r}) stopped during the run; its log is in AReaL's log folder ({role}.log)."


def _server_launch_message(config: Any, call: BaseException) -> str:
    from areal_a3po.servers import server_kind

    kind, log = server_kind(config.rollout.backend), rollout_log(config)
    reason = server_log_reason(log)
    said = f" Its log ends with: {reason}" if reason else ""
    return (
        f"the inference server ({kind.name}, rollout.backend={config.rollout.backend}) did not come up "
        f"({' '.join(str(call.reason).split())[:300]}).{said} Its output is in {log}. If it was still loading, raise "
        f"rollout.setup_timeout (now {config.rollout.setup_timeout:g} s); if it failed, that log says why "
        f"({kind.launch_hint}). The run's workers and server have been stopped."
    )
