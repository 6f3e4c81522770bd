"""AReaL's remote rollout engines (vLLM, SGLang), as the plugin's trainer hands them to AReaL.

AReaL picks ``RemotevLLMEngine`` or ``RemoteSGLangEngine`` by name in ``PPOTrainer._init_rollout``, and
its rollout workers import the class by path; ``A3POTrainer`` has AReaL build these subclasses
instead (``areal_compat.replaced``). Each is AReaL's engine with two differences:

- its inner ``RemoteInfEngine`` is ``ServerStartEngine``: a server process that exits while AReaL
  waits for it to answer ends the wait at once, naming its exit status. AReaL (1.0.4, 2.0.0) is wrong
  for us here: ``RemoteInfEngine._wait_for_server`` asks ``/health`` until ``rollout.setup_timeout``
  whatever happens to the process, so a server that dies at start (a wrong setting, no CPU engine)
  costs the whole timeout (measured: 712 s for an SGLang server that had died in seconds);
- on SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1`` in the rollout worker's environment) the server
  starts through ``areal_a3po.sglang_cpu``, the stand-in for ``sgl_kernel``'s CUDA-only library
  (``CPUSGLangBackend``); anywhere else it is AReaL's command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from areal.api.cli_args import SGLangConfig
from areal.engine.sglang_remote import RemoteSGLangEngine, SGLangBackend
from areal.engine.vllm_remote import RemotevLLMEngine, VLLMBackend
from areal.infra.remote_inf_engine import RemoteInfEngine

from areal_a3po.sglang_cpu import SERVER_MODULE, cpu_engine_requested

__all__ = ["A3POSGLangEngine", "A3POvLLMEngine", "CPUSGLangBackend", "ServerExited", "ServerStartEngine", "server_command"]


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


class A3POvLLMEngine(RemotevLLMEngine):
    """AReaL's ``RemotevLLMEngine`` with ``ServerStartEngine`` inside."""

    def __init__(self, config):
        super().__init__(config)
        self._engine = ServerStartEngine(config, VLLMBackend())


class A3POSGLangEngine(RemoteSGLangEngine):
    """AReaL's ``RemoteSGLangEngine`` with ``ServerStartEngine`` and ``CPUSGLangBackend`` inside."""

    def __init__(self, config):
        super().__init__(config)
        self._engine = ServerStartEngine(config, CPUSGLangBackend())
