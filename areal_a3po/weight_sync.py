"""The xccl weight-update group, bounded: a named error in ``actor.weight_update_group_timeout`` seconds.

With ``actor.weight_update_mode: xccl`` AReaL's trainer rank 0 opens a rendezvous
(``tcp://<this host>:<free port>``), asks every inference server over HTTP to join it, and waits for
them: that group then carries every weight push (a broadcast per tensor bucket). AReaL 1.0.4 gives the
rendezvous, and each broadcast on the group, ``DIST_GROUP_DEFAULT_TIMEOUT`` = 7200 s. So a server
that never joins (it cannot reach the trainer's address: a firewall, or the interface AReaL's
``gethostip`` picked is not routable from the server's host; or it hangs) holds the whole run for two
hours and then ends it with torch's bare "Timed out after 7201 seconds waiting for clients. 1/2
clients joined."; a port taken between AReaL's free-port probe and its bind ends it with
"EADDRINUSE" and nothing saying what that port was for.

``BoundedWeightSyncMixin`` calls AReaL's own ``_init_weight_update_from_distributed`` with that
constant set to ``actor.weight_update_group_timeout`` for the duration of the call (AReaL reads it
there, from its engine module, and has no config key for it), so the group forms within that bound
and its broadcasts time out after it; a torch distributed error while forming the group becomes a
``WeightSyncError`` that names the servers, the address they had to reach, the key and the fix.
"""

from __future__ import annotations

import contextlib
import datetime
import sys
from collections.abc import Iterator
from typing import Any

#: The module-level constant AReaL's engines pass as the weight-update group's timeout.
AREAL_TIMEOUT_NAME = "DIST_GROUP_DEFAULT_TIMEOUT"
GROUP_METHOD = "_init_weight_update_from_distributed"
TIMEOUT_KEY = "actor.weight_update_group_timeout"
DEFAULT_GROUP_TIMEOUT = 300.0
#: How every ``WeightSyncError`` message starts: the controller finds it in the text of the error that
#: AReaL's RPC makes of it (``Engine method 'connect_engine' failed: <message>``; on Ray, a traceback).
PREFIX = "actor.weight_update_mode=xccl: "


class WeightSyncError(RuntimeError):
    """The xccl weight-update group could not form; the message names the servers, the key and the fix."""


def _areal_module(cls: type, method: str):
    """The module of the first class in ``cls``'s MRO, not the plugin's, that defines ``method``."""
    for klass in cls.__mro__:
        if method in vars(klass) and not klass.__module__.startswith("areal_a3po"):
            return sys.modules[klass.__module__]
    return None


@contextlib.contextmanager
def group_timeout(module: Any, seconds: float) -> Iterator[None]:
    """``module.DIST_GROUP_DEFAULT_TIMEOUT`` = ``seconds`` inside the block, AReaL's value after it."""
    if module is None or not hasattr(module, AREAL_TIMEOUT_NAME):
        yield
        return
    before = getattr(module, AREAL_TIMEOUT_NAME)
    setattr(module, AREAL_TIMEOUT_NAME, datetime.timedelta(seconds=seconds))
    try:
        yield
    finally:
        setattr(module, AREAL_TIMEOUT_NAME, before)


def group_error_message(exc: BaseException, *, servers: list[str] | None, host: Any, port: Any, timeout: float) -> str:
    """What went wrong while forming the group, which key bounds it, and what to do."""
    where = f"tcp://{host}:{port}"
    who = f"the inference server(s) {', '.join(servers)}" if servers else "the inference server(s)"
    if "EADDRINUSE" in str(exc) or "address already in use" in str(exc):
        return (
            f"{PREFIX}the trainer could not open the weight-update group at {where}: "
            f"the port was taken between AReaL's free-port probe and its bind, by another process on this host "
            f"({exc}). Run again (AReaL picks another port), or set actor.weight_update_mode=disk."
        )
    if "Timed out" in str(exc) or "timed out" in str(exc):
        return (
            f"{PREFIX}{who} did not join the trainer's weight-update group at {where} "
            f"within {TIMEOUT_KEY}={timeout:g} s ({exc}). A server joins from its own host: it must reach "
            f"{host}:{port} (a firewall, or an address of this host the server cannot route to) and be answering "
            f"(its log: rollout.log in AReaL's log folder). If it is only slow, raise {TIMEOUT_KEY}; "
            "otherwise set actor.weight_update_mode=disk."
        )
    return (
        f"{PREFIX}the trainer's weight-update group at {where} with {who} failed to form "
        f"({type(exc).__name__}: {exc}). Check rollout.log in AReaL's log folder, or set actor.weight_update_mode=disk."
    )


def server_addresses(engine: Any) -> list[str] | None:
    """The ``host:port`` of each inference server an AReaL rollout engine talks to, where it knows them:
    ``RemoteInfEngine.addresses`` (also behind ``RemotevLLMEngine``/``RemoteSGLangEngine``), or the
    single controller's ``server_infos``; None for a callback to the controller (its workers' view)."""
    for holder in (engine, getattr(engine, "_engine", None)):
        addresses = getattr(holder, "addresses", None)
        if addresses:
            return [str(a) for a in addresses]
    infos = getattr(engine, "server_infos", None)
    if infos:
        return [f"{i.host}:{i.port}" for i in infos]
    return None


class BoundedWeightSyncMixin:
    """Put before an AReaL train engine class (FSDP, Megatron) whose ``_init_weight_update_from_distributed``
    forms the xccl group: that call is bounded by ``actor.weight_update_group_timeout`` and its
    failures are ``WeightSyncError``."""

    def _init_weight_update_from_distributed(self, meta: Any) -> None:
        import torch.distributed as dist

        seconds = float(getattr(self.config, "weight_update_group_timeout", DEFAULT_GROUP_TIMEOUT))
        with group_timeout(_areal_module(type(self), GROUP_METHOD), seconds):
            try:
                super()._init_weight_update_from_distributed(meta)  # type: ignore[misc]
            except dist.DistError as exc:
                raise WeightSyncError(
                    group_error_message(exc, servers=server_addresses(getattr(self, "rollout_engine", None)),
                                        host=getattr(meta, "nccl_master_address", "?"),
                                        port=getattr(meta, "nccl_master_port", "?"), timeout=seconds)
                ) from exc
