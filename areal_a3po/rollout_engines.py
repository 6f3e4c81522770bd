"""AReaL's remote rollout engines (vLLM, SGLang), as the plugin's trainer hands them to AReaL.

AReaL picks ``RemotevLLMEngine`` or ``RemoteSGLangEngine`` by name in ``PPOTrainer._init_rollout``, and
its rollout workers import the class by path; ``A3POTrainer`` has AReaL build these subclasses
instead (``areal_compat.replaced``). Each is AReaL's engine with three differences:

- its inner ``RemoteInfEngine`` is ``ServerStartEngine``: a server process that exits while AReaL
  waits for it to answer ends the wait at once, naming its exit status. AReaL (1.0.4, 2.0.0) is wrong
  for us here: ``RemoteInfEngine._wait_for_server`` asks ``/health`` until ``rollout.setup_timeout``
  whatever happens to the process, so a server that dies at start (a wrong setting, no CPU engine)
  costs the whole timeout (measured: 712 s for an SGLang server that had died in seconds);
- on SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1`` in the rollout worker's environment) the server
  starts through ``areal_a3po.sglang_cpu``, the stand-in for ``sgl_kernel``'s CUDA-only library
  (``CPUSGLangBackend``); anywhere else it is AReaL's command;
- every generated token is tagged with the weight version that served it (``VersionTagEngine``).
  AReaL (1.0.4, 2.0.0) tags each chunk of a generation with its version as it reads it when the
  reply is processed (``RemoteInfEngine.agenerate``), so a chunk generated before a weight update
  and processed after the trainer's ``set_version`` is tagged one version too new, and AReaL's fix
  on its main branch (PR 1569: the version when the request is built) tags a request that the
  server held through the update one version too old. The plugin tags a chunk with the version its
  server held while it generated: SGLang's own stamp (``meta_info["weight_version"]``, which the
  plugin's updates set, ``TaggingSGLangBackend``), else what the engine knows from its own pause,
  update and continue calls (``ServedVersions``). AReaL's generation loop is not copied: the
  backend records each chunk's request and reply, and ``agenerate`` rewrites the reply's
  ``output_versions`` after AReaL's loop returns.
"""

from __future__ import annotations

import contextvars
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from areal.api.cli_args import SGLangConfig
from areal.engine.sglang_remote import RemoteSGLangEngine, SGLangBackend
from areal.engine.vllm_remote import RemotevLLMEngine, VLLMBackend
from areal.infra.remote_inf_engine import RemoteInfEngine
from areal.utils import logging, stats_tracker

from areal_a3po.sglang_cpu import SERVER_MODULE, cpu_engine_requested

__all__ = [
    "TAG_STATS",
    "A3POSGLangEngine",
    "A3POvLLMEngine",
    "CPUSGLangBackend",
    "ServedVersions",
    "ServerExited",
    "ServerStartEngine",
    "TaggingSGLangBackend",
    "TaggingVLLMBackend",
    "VersionTagEngine",
    "server_command",
]

logger = logging.getLogger("A3PO")


class ServerExited(RuntimeError):
    """The inference server's process exited before it answered; its own reason is in its log."""


class ServerStartEngine(RemoteInfEngine):
    """AReaL's ``RemoteInfEngine`` whose wait for a server it launched ends when the server's process exits."""

    def _wait_for_server(self, address: str, process: subprocess.Popen | None = None) -> None:
        if process is None:  # a server this engine did not launch: AReaL's wait
            return super()._wait_for_server(address, process)
        # AReaL's loop (ask /health once a second until rollout.setup_timeout), and the process's exit.
        base_url = f"http://{address}"
        deadline = time.monotonic() + self.config.setup_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerExited(
                    f"the server process exited with status {process.returncode} before it answered at {address}")
            if self.check_health(base_url):
                return
            time.sleep(1)
        raise TimeoutError(f"server launch failed: no answer at {address} within rollout.setup_timeout")


def server_command(server_args: dict[str, Any]) -> list[str]:
    """AReaL's server command for ``server_args`` (``SGLangConfig.build_cmd_from_args``: ``python3 -m
    <module> <arguments>``) run through ``areal_a3po.sglang_cpu``: ``python3 -m areal_a3po.sglang_cpu
    <module> <arguments>``."""
    cmd = SGLangConfig.build_cmd_from_args(server_args)
    at = cmd.index("-m") + 1
    return [*cmd[:at], SERVER_MODULE, *cmd[at:]]


class CPUSGLangBackend(SGLangBackend):
    """AReaL's ``SGLangBackend``; on SGLang's CPU engine the server starts through ``areal_a3po.sglang_cpu``."""

    def launch_server(self, server_args: dict[str, Any]) -> subprocess.Popen:
        if not cpu_engine_requested():
            return super().launch_server(server_args)
        return subprocess.Popen(server_command(server_args), env=os.environ.copy(), stdout=sys.stdout, stderr=sys.stdout)


# --- Version tags: each chunk tagged with the version that served it ---

#: The rollout stats of the tags, per generate call (``rollout/<key>`` in the run's stats, the mean over
#: the step's generate calls): tokens whose tag differs from AReaL's, and tokens whose serving version
#: the client could not tell (generated before or after a weight update; tagged with the later version).
TAG_STATS = ("a3po/version_tags/retagged_tokens", "a3po/version_tags/ambiguous_tokens")


@dataclass
class _Chunk:
    """One request of a generation (one pass of AReaL's chunk loop) and what its reply says."""

    built_version: int  # AReaL's version when the request was built (PR 1569's tag)
    earliest: int  # the first serving interval that can have generated it
    tokens: int | None = None  # set from the reply
    tag: int | None = None
    ambiguous: bool = False


@dataclass
class _Call:
    """The chunks of one ``agenerate`` call, in order."""

    chunks: list[_Chunk] = field(default_factory=list)


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("a3po_version_tags", default=None)


class ServedVersions:
    """Which weight version the servers of one engine serve, from that engine's own calls.

    AReaL pauses the servers (``pause_generation``: both vLLM and SGLang abort what runs, and hold
    what arrives, until ``continue_generation``), loads the new weights (``update_weights_from_*``
    with ``meta.version``) and continues them, and only then calls ``set_version``. So the servers'
    time splits into serving intervals, interval n between the n-th continue and the next pause
    (interval 0 from the start), each served by one version: ``served[n]`` is the version loaded
    during pause n (the one before if none was), interval 0 the version the engine was set to.

    A chunk is generated within one interval: a pause aborts what is running, and a request held
    by a paused server starts after the continue. The engine knows, for each chunk, the first
    interval it can have run in (the one under way when its request was built, or the next while a
    pause is under way) and, at its reply, the last: for an aborted reply the one before the last
    pause begun, for a completed one the current interval, or the one before it while the servers
    are paused or being paused. When they are the same, that interval's version is the tag. When
    not (a completed reply processed after a whole pause-update-continue began after its request:
    it ran before the pause, or was held and ran after), the tag is the later version (a held
    request, what AReaL's own tag gives when its reply comes after ``set_version``) and the chunk
    counts as ambiguous.

    An engine that never pauses the servers (AReaL's SPMD mode: only trainer rank 0's engine does;
    an evaluation engine) cannot tell the intervals: it tags with the version at the request's
    build (AReaL PR 1569's rule). Thread-safe: the trainer's calls come on AReaL's RPC threads,
    replies on the rollout event loop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._begun = 0  # pauses begun
        self._acknowledged = 0  # pauses the servers answered (they are paused)
        self._continued = 0  # continues begun
        self._loading: int | None = None  # the version loaded during the pause under way
        self._loaded = False  # a weight update came during the pause under way
        self._served: dict[int, int | None] = {0: None}  # interval → its version (None: unknown)

    def pausing(self) -> None:
        """Before AReaL's ``pause_generation``."""
        with self._lock:
            self._begun += 1
            self._loading, self._loaded = None, False

    def paused(self) -> None:
        """After AReaL's ``pause_generation`` returned: the servers hold every new request."""
        with self._lock:
            self._acknowledged = self._begun

    def loading(self, version: int | None) -> None:
        """Before AReaL's ``update_weights_from_*(meta)``: ``meta.version`` is being loaded."""
        with self._lock:
            self._loading, self._loaded = version, True

    def continuing(self) -> None:
        """Before AReaL's ``continue_generation`` (the update is complete): the next interval's version."""
        with self._lock:
            n = self._begun
            self._served[n] = self._loading if self._loaded else self._served.get(n - 1)
            self._continued = n
            for old in [i for i in self._served if i < n - 64]:  # a chunk spanning 64 updates is ambiguous anyway
                del self._served[old]

    def version_set(self, version: int) -> None:
        """After AReaL's ``set_version``: outside a pause, the version of the interval under way (the start,
        a recover; after an update it is the version loaded already)."""
        with self._lock:
            if self._continued == self._begun:
                self._served[self._begun] = version

    def start(self, built_version: int) -> _Chunk:
        """A chunk's request is being built, with AReaL's version ``built_version``."""
        with self._lock:
            if self._begun == 0:  # before the first pause the servers hold what the engine was set to
                self._served[0] = built_version
            return _Chunk(built_version=built_version, earliest=self._acknowledged)

    def tag(self, chunk: _Chunk, stop_reason: str | None, current_version: int, server_version: int | None = None) -> None:
        """Set ``chunk.tag`` from its reply: ``server_version`` (the server's own stamp) when there is
        one, else the interval that generated it; ``current_version``: AReaL's, for an unknown one."""
        if server_version is not None:
            chunk.tag = server_version
            return
        with self._lock:
            if self._begun == 0:  # never paused the servers: no intervals to tell
                chunk.tag = chunk.built_version
                return
            if stop_reason == "abort":
                latest = self._begun - 1
            else:
                latest = self._begun if self._continued == self._begun else self._begun - 1
            latest = max(latest, chunk.earliest)
            served = self._served.get(latest)
        chunk.ambiguous = latest != chunk.earliest
        chunk.tag = current_version if served is None else served


class VersionTaggingBackend:
    """Mixin for an AReaL backend: records each chunk's request and reply for the engine's tags
    (inside ``VersionTagEngine.agenerate`` only), otherwise AReaL's backend call for call."""

    served_versions: ServedVersions | None = None
    #: AReaL's version now, for a reply whose interval's version is unknown.
    current_version = None

    def build_generation_request(self, req: Any, with_lora: bool, version: int) -> Any:
        call = _CALL.get()
        if call is not None and self.served_versions is not None:
            call.chunks.append(self.served_versions.start(version))
        return super().build_generation_request(req, with_lora=with_lora, version=version)  # type: ignore[misc]

    def parse_generation_response(self, response: dict[str, Any]) -> Any:
        result = super().parse_generation_response(response)  # type: ignore[misc]
        call = _CALL.get()
        if call is not None and self.served_versions is not None and call.chunks and call.chunks[-1].tokens is None:
            chunk = call.chunks[-1]
            chunk.tokens = len(result.output_tokens)
            self.served_versions.tag(chunk, result.stop_reason, self.current_version(), self.server_version(response))
        return result

    def server_version(self, response: dict[str, Any]) -> int | None:
        """The version the server says generated ``response``; None: it does not say."""
        return None


class TaggingVLLMBackend(VersionTaggingBackend, VLLMBackend):
    """AReaL's ``VLLMBackend`` with the chunks recorded. AReaL's vLLM server does not say which version
    served a reply: the tags come from ``ServedVersions``."""


#: SGLang's weight-update endpoints whose request takes ``weight_version`` (SGLang ≥ 0.5: set on the
#: server after a successful update, and stamped on every reply as ``meta_info["weight_version"]``).
SGLANG_VERSIONED_UPDATES = ("/update_weights_from_distributed", "/update_weights_from_disk")


class TaggingSGLangBackend(VersionTaggingBackend, CPUSGLangBackend):
    """The plugin's SGLang backend with the chunks recorded and SGLang's own version stamp.

    Each full-model weight update also sends ``weight_version`` = ``meta.version``: SGLang sets it after
    the update succeeds, before AReaL continues generation, and its tokenizer manager stamps each reply
    with the version set when the reply is built. AReaL pauses SGLang in ``abort`` mode, which returns
    only once every running request's reply is out (stamped with the old version), and a request that
    arrives while paused waits until the continue (stamped with the new one): so the stamp is the
    version that generated the reply. Before the first update SGLang says ``default``
    (``--weight-version``): the tag then comes from ``ServedVersions``."""

    def build_distributed_weight_update_requests(self, meta: Any, param_specs: Any) -> Any:
        return _with_weight_version(super().build_distributed_weight_update_requests(meta, param_specs), meta)

    def build_disk_weight_update_requests(self, meta: Any) -> Any:
        return _with_weight_version(super().build_disk_weight_update_requests(meta), meta)

    def server_version(self, response: dict[str, Any]) -> int | None:
        stamp = (response.get("meta_info") or {}).get("weight_version")
        try:
            return int(stamp)
        except (TypeError, ValueError):  # "default": no update with a version yet
            return None


def _with_weight_version(requests: Any, meta: Any) -> Any:
    if getattr(meta, "version", None) is not None:
        for request in requests.requests:
            if request.endpoint in SGLANG_VERSIONED_UPDATES:
                request.payload = {**request.payload, "weight_version": str(meta.version)}
    return requests


class VersionTagEngine(ServerStartEngine):
    """``ServerStartEngine`` whose generated tokens carry the version that served them.

    ``agenerate`` is AReaL's; its backend (``VersionTaggingBackend``) records each chunk, and the
    reply's ``output_versions`` are then those tags (``ServedVersions``). The engine's own pause,
    update, continue and ``set_version`` calls feed ``ServedVersions`` and are AReaL's otherwise.
    Each call adds ``TAG_STATS`` to AReaL's ``rollout`` stats. Should AReaL's loop ever record chunks
    differently from its replies (their tokens do not add up), its own tags are kept, with one warning.
    """

    def __init__(self, config: Any, backend: VersionTaggingBackend):
        super().__init__(config, backend)
        self.served_versions = ServedVersions()
        backend.served_versions = self.served_versions
        backend.current_version = self.get_version
        self._warned_mismatch = False

    async def agenerate(self, req: Any) -> Any:
        call = _Call()
        token = _CALL.set(call)
        try:
            response = await super().agenerate(req)
        finally:
            _CALL.reset(token)
        self._retag(response, call)
        return response

    def _retag(self, response: Any, call: _Call) -> None:
        versions = response.output_versions
        if any(c.tag is None for c in call.chunks) or sum(c.tokens or 0 for c in call.chunks) != len(versions):
            if not self._warned_mismatch:
                self._warned_mismatch = True
                logger.warning(
                    "A-3PO: AReaL's generation loop answered %d chunk(s) with %d token(s) in all, not what the "
                    "plugin recorded (%s); AReaL's own version tags are kept. Reported once.",
                    len(call.chunks), len(versions), [c.tokens for c in call.chunks])
            return
        tags = [c.tag for c in call.chunks for _ in range(c.tokens or 0)]
        retagged = sum(a != b for a, b in zip(tags, versions))
        ambiguous = sum(c.tokens or 0 for c in call.chunks if c.ambiguous)
        response.output_versions = tags
        stats_tracker.get("rollout").scalar(**dict(zip(TAG_STATS, (retagged, ambiguous))))

    def pause_generation(self) -> None:
        self.served_versions.pausing()
        out = super().pause_generation()
        self.served_versions.paused()
        return out

    def continue_generation(self) -> None:
        self.served_versions.continuing()
        return super().continue_generation()

    def update_weights_from_distributed(self, meta: Any, param_specs: Any) -> Any:
        self.served_versions.loading(meta.version)
        return super().update_weights_from_distributed(meta, param_specs)

    def update_weights_from_disk(self, meta: Any) -> Any:
        self.served_versions.loading(meta.version)
        return super().update_weights_from_disk(meta)

    def set_version(self, version: int) -> None:
        super().set_version(version)
        self.served_versions.version_set(version)


class A3POvLLMEngine(RemotevLLMEngine):
    """AReaL's ``RemotevLLMEngine`` with ``VersionTagEngine`` (a ``ServerStartEngine``) inside."""

    def __init__(self, config):
        super().__init__(config)
        self._engine = VersionTagEngine(config, TaggingVLLMBackend())


class A3POSGLangEngine(RemoteSGLangEngine):
    """AReaL's ``RemoteSGLangEngine`` with ``VersionTagEngine`` (a ``ServerStartEngine``) and
    ``TaggingSGLangBackend`` (a ``CPUSGLangBackend``) inside."""

    def __init__(self, config):
        super().__init__(config)
        self._engine = VersionTagEngine(config, TaggingSGLangBackend())
