"""The xccl weight-update group and its pushes, bounded: a named error within ``actor.weight_update_group_timeout``.

With ``actor.weight_update_mode: xccl`` AReaL's trainer rank 0 opens a rendezvous
(``tcp://<this host>:<free port>``), asks every inference server over HTTP to join it, and waits for
them; that group then carries every weight push (a broadcast per tensor bucket). AReaL (1.0.4, 2.0.0)
gives the rendezvous, and each broadcast on the group, ``DIST_GROUP_DEFAULT_TIMEOUT`` = 7200 s, with
no config key: a server that never joins (it cannot reach the trainer's address, or it refused, or it
hangs) holds the run for two hours and ends it with torch's bare "1/2 clients joined.", while the
trainer's other ranks wait in a barrier for as long.

``BoundedWeightSyncMixin`` calls AReaL's own ``_init_weight_update_from_distributed`` with that
constant set to ``actor.weight_update_group_timeout`` for the duration of the call (AReaL reads it
there, from its engine module), so that the group forms within the bound and its broadcasts time
out after it. What guarantees what:

- forming the group: rank 0's failure (a ``torch.distributed`` error: the rendezvous timed out, or its
  port was taken) becomes a ``WeightSyncError`` naming the servers, the address they had to reach,
  the reason a server gave for refusing (where it answered the join request with an error), the key
  and the fix, and every trainer rank raises it (``ranks.raise_together`` over the CPU group), not
  only rank 0;
- the pushes: NCCL connects lazily, at the group's first broadcast, so a server that joined the
  rendezvous but cannot be reached over NCCL fails there. The group is created with NCCL's blocking
  wait (``TORCH_NCCL_BLOCKING_WAIT=1`` while it is created: a broadcast that does not complete
  within the bound raises in Python instead of NCCL's watchdog aborting the process), and an error in
  a push becomes a ``WeightSyncError`` on rank 0; the controller then stops every rank. On gloo (CPU) the same code runs and is tested; the NCCL settings are not
  (``docs/ranks.md``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import os
import re
from collections.abc import Iterator
from typing import Any

from areal_a3po.failures import RunFailure, find_cause

TIMEOUT_KEY = "actor.weight_update_group_timeout"
DEFAULT_GROUP_TIMEOUT = 300.0
#: How every ``WeightSyncError`` message starts. A trainer rank's error reaches the controller as text
#: (AReaL's RPC: ``Engine method 'connect_engine' failed: <message>``; on Ray, a traceback): the
#: controller finds the message by it (``from_rpc_error``).
PREFIX = "actor.weight_update_mode=xccl: "
#: NCCL's switch that makes a collective that times out raise in the waiting thread (and not abort
#: the process from its watchdog); read by each NCCL process group when it is created.
NCCL_BLOCKING_WAIT = "TORCH_NCCL_BLOCKING_WAIT"

__all__ = ["DEFAULT_GROUP_TIMEOUT", "PREFIX", "BoundedWeightSyncMixin", "WeightSyncError", "from_rpc_error",
           "group_error_message", "server_addresses"]


class WeightSyncError(RunFailure):
    """The xccl weight-update group did not form, or a push on it failed; the message names the servers,
    the key and the fix."""

    resumable = False


#: The module constant AReaL's engines read as the weight-update group's timeout.
AREAL_TIMEOUT_NAME = "DIST_GROUP_DEFAULT_TIMEOUT"
GROUP_METHOD = "_init_weight_update_from_distributed"


def areal_engine_module(cls: type):
    """The module of AReaL's engine class in ``cls``'s MRO that forms the group (FSDP's, Megatron's):
    where AReaL's method reads ``DIST_GROUP_DEFAULT_TIMEOUT``; a named error where it does not."""
    import sys

    from areal_a3po.areal_compat import AReaLPrivateNameMissing, PrivateName

    for klass in cls.__mro__:
        if GROUP_METHOD in vars(klass) and not klass.__module__.startswith("areal_a3po"):
            module = sys.modules[klass.__module__]
            PrivateName(module.__name__, AREAL_TIMEOUT_NAME, "bound the xccl weight-update group by "
                        f"{TIMEOUT_KEY} (areal_a3po.weight_sync)").resolve()
            return module
    raise AReaLPrivateNameMissing(f"areal-a3po: no AReaL class in {cls.__name__}'s bases defines {GROUP_METHOD}, "
                                  f"which the plugin calls to bound the xccl weight-update group ({TIMEOUT_KEY}).")


@contextlib.contextmanager
def areal_group_timeout(module: Any, seconds: float) -> Iterator[None]:
    """AReaL's ``DIST_GROUP_DEFAULT_TIMEOUT`` in ``module`` = ``seconds`` inside the block, AReaL's value
    after it; NCCL groups created inside use blocking wait."""
    before = getattr(module, AREAL_TIMEOUT_NAME)
    setattr(module, AREAL_TIMEOUT_NAME, datetime.timedelta(seconds=seconds))
    blocking = os.environ.get(NCCL_BLOCKING_WAIT)
    os.environ[NCCL_BLOCKING_WAIT] = "1"
    try:
        yield
    finally:
        setattr(module, AREAL_TIMEOUT_NAME, before)
        if blocking is None:
            os.environ.pop(NCCL_BLOCKING_WAIT, None)
        else:
            os.environ[NCCL_BLOCKING_WAIT] = blocking


@contextlib.contextmanager
def join_requests(engine: Any) -> Iterator[list]:
    """The futures of the engine's ``init_weights_update_group`` requests made inside the block (the
    servers' answers to "join the group"), to name a server's refusal."""
    sent: list = []
    original = getattr(engine, "init_weights_update_group", None)
    if original is None:
        yield sent
        return

    def recorded(*args: Any, **kwargs: Any):
        future = original(*args, **kwargs)
        sent.append(future)
        return future

    engine.init_weights_update_group = recorded  # this instance only, until the block ends
    try:
        yield sent
    finally:
        del engine.init_weights_update_group


def refusal(sent: list, wait: float = 15.0) -> str | None:
    """The first error a server answered a join request with (waiting up to ``wait`` s for the answers):
    the HTTP status of AReaL's failed request where it carries one (its reason is in the server's log),
    else the error's first 300 characters."""
    for future in sent:
        try:
            future.result(timeout=wait)
        except concurrent.futures.TimeoutError:
            continue
        except Exception as exc:  # noqa: BLE001 - the server's answer, for the message
            # Read from the text, not the exception chain: AReaL's ``arequest_with_retry`` (1.0.4 and
            # 2.0.0 alike) raises a plain RuntimeError after its retry loop, outside any ``except``, so
            # neither ``__cause__`` nor ``__context__`` holds aiohttp's ClientResponseError; only its
            # repr in the message ("Last error: ClientResponseError(..., status=400, message='...')").
            text = " ".join(str(exc).split())
            status = re.search(r"status=(\d+), message='([^']*)'", text)
            if status:
                endpoint = re.search(r"Endpoint: (\S+?)\.? ", text)
                return f"HTTP {status[1]} {status[2]}" + (f" to {endpoint[1]}" if endpoint else "")
            return text[:300] or type(exc).__name__
    return None


def group_error_message(exc: BaseException, *, servers: list[str] | None, host: Any, port: Any, timeout: float,
                        refused: str | None = None) -> str:
    """What went wrong while forming the group (by the type of ``exc``), which key bounds it, what to do."""
    import torch.distributed as dist
    from areal.utils.network import format_hostport

    where = f"tcp://{format_hostport(str(host), port)}"
    who = f"the inference server(s) {', '.join(servers)}" if servers else "the inference server(s)"
    if isinstance(exc, dist.DistNetworkError):  # rank 0 could not bind its rendezvous store
        return (
            f"{PREFIX}the trainer could not open the weight-update group at {where}: the port was taken between "
            f"AReaL's free-port probe and its bind, by another process on this host ({exc}). Run again (AReaL "
            "picks another port), or set actor.weight_update_mode=disk."
        )
    if isinstance(exc, dist.DistStoreError):  # the rendezvous timed out: a server did not join
        why = f" The server answered the request to join: {refused}." if refused else ""
        return (
            f"{PREFIX}{who} did not join the trainer's weight-update group at {where} within "
            f"{TIMEOUT_KEY}={timeout:g} s ({exc}).{why} A server joins from its own host: it must reach "
            f"{format_hostport(str(host), port)} (a firewall, or an address of this host the server cannot route to) and be "
            f"answering (its log: rollout.log in AReaL's log folder). If it is only slow, raise {TIMEOUT_KEY}; "
            "otherwise set actor.weight_update_mode=disk."
        )
    return (
        f"{PREFIX}the trainer's weight-update group at {where} with {who} failed to form ({type(exc).__name__}: "
        f"{exc}). Check rollout.log in AReaL's log folder, or set actor.weight_update_mode=disk."
    )


def push_error_message(exc: BaseException, *, servers: list[str] | None, timeout: float) -> str:
    who = f"the inference server(s) {', '.join(servers)}" if servers else "the inference server(s)"
    return (
        f"{PREFIX}a weight push to {who} over the weight-update group failed ({type(exc).__name__}: {exc}). "
        f"NCCL connects at the first push; a push that does not complete within {TIMEOUT_KEY}={timeout:g} s "
        "fails here. Check rollout.log in AReaL's log folder (a server that died, or one the trainer cannot "
        "reach over NCCL's network), or set actor.weight_update_mode=disk."
    )


def from_rpc_error(exc: BaseException, servers: list[str] | None) -> WeightSyncError | None:
    """A trainer rank's ``WeightSyncError`` as the controller receives it: its message found (from
    ``PREFIX`` on) in the text of the error AReaL's RPC made of it, the servers' addresses (which only the
    controller knows) added; None when ``exc``'s chain holds none."""
    found = find_cause(exc, WeightSyncError)
    if found is not None:
        return found
    while exc is not None:
        text = str(exc)
        if PREFIX in text:
            message = text[text.index(PREFIX):].splitlines()[0].strip()
            if servers:
                message += f" The rollout's servers: {', '.join(servers)}."
            return WeightSyncError(message)
        exc = exc.__cause__ or exc.__context__
    return None


def server_addresses(engine: Any) -> list[str] | None:
    """The address of each inference server an AReaL rollout engine talks to, where it knows them:
    ``RemoteInfEngine.addresses`` (also behind ``RemotevLLMEngine``/``RemoteSGLangEngine``), or the
    single controller's ``server_infos`` (joined with AReaL's ``format_hostport``: IPv6 hosts in
    brackets); None for a callback to the controller (its workers' view)."""
    from areal.utils.network import format_hostport

    for holder in (engine, getattr(engine, "_engine", None)):
        addresses = getattr(holder, "addresses", None)
        if addresses:
            return [str(a) for a in addresses]
    infos = getattr(engine, "server_infos", None)
    if infos:
        return [format_hostport(i.host, i.port) for i in infos]
    return None


class BoundedWeightSyncMixin:
    """Put before an AReaL train engine class whose ``_init_weight_update_from_distributed`` forms the
    xccl group (FSDP, Megatron; Archon forms it elsewhere and is not bounded): its xccl group forms within
    ``actor.weight_update_group_timeout`` or every rank raises one ``WeightSyncError``, and a failed
    push is a ``WeightSyncError`` (see the module's docstring)."""

    def _group_timeout(self) -> float:
        return float(getattr(self.config, "weight_update_group_timeout", DEFAULT_GROUP_TIMEOUT))

    def _init_weight_update_from_distributed(self, meta: Any) -> None:
        import torch.distributed as dist

        from areal_a3po.ranks import raise_together

        seconds, error = self._group_timeout(), None
        engine = getattr(self, "rollout_engine", None)
        with areal_group_timeout(areal_engine_module(type(self)), seconds), join_requests(engine) as sent:
            try:
                super()._init_weight_update_from_distributed(meta)  # type: ignore[misc]
            except dist.DistError as exc:
                error = WeightSyncError(group_error_message(
                    exc, servers=server_addresses(engine), host=getattr(meta, "nccl_master_address", "?"),
                    port=getattr(meta, "nccl_master_port", "?"), timeout=seconds, refused=refusal(sent)))
                error.__cause__ = exc
            except Exception as exc:  # noqa: BLE001 - any other failure of rank 0: every rank raises it
                error = exc
        # Rank 0 formed the group (or failed to); the other ranks return from AReaL's method at once
        # and would wait for rank 0 in AReaL's next barrier (7200 s): they learn its outcome here.
        raise_together(error, getattr(self, "cpu_group", None))

    def _update_weights_from_distributed(self, meta: Any) -> None:
        try:
            super()._update_weights_from_distributed(meta)  # type: ignore[misc]
        except RuntimeError as exc:  # a broadcast to the servers failed (gloo: RuntimeError) or timed out (NCCL: DistBackendError)
            raise WeightSyncError(push_error_message(
                exc, servers=server_addresses(getattr(self, "rollout_engine", None)), timeout=self._group_timeout())) from exc
