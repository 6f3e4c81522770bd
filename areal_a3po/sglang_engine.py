"""AReaL's SGLang rollout engine, launching the server through ``areal_a3po.sglang_cpu`` on CPU.

In AReaL's single-controller mode the rollout worker (``areal.infra.rpc.rpc_server``) imports the
rollout engine class by ``module.name`` and calls its ``launch_server``, which starts
``python3 -m areal.experimental.inference_service.sglang.launch_server <args>`` with the worker's
environment (``rollout.scheduling_spec[].env_vars`` and the controller's ``sys.path`` as
``PYTHONPATH``; AReaL 2.0.0's module is ``areal.v2.inference_service.sglang.launch_server``). On a
CPU-only machine that server dies at import (``sgl_kernel``'s compiled library
needs ``libcuda.so.1``; see ``areal_a3po.sglang_cpu``). ``A3POTrainer`` therefore hands AReaL this
class when the rollout runs SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1`` in the rollout's
``env_vars`` or the controller's environment), and its backend launches the same command through
``areal_a3po.sglang_cpu`` (``python3 -m areal_a3po.sglang_cpu <AReaL's module> <arguments>``: it installs
the stand-in, then runs AReaL's module).
Everything else (requests, pause, weight updates) is AReaL's ``SGLangBackend``; where the CPU engine
is not selected in the worker, ``launch_server`` is AReaL's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from areal.api.cli_args import SGLangConfig
from areal.engine.sglang_remote import RemoteSGLangEngine, SGLangBackend

from areal_a3po.sglang_cpu import SERVER_MODULE, cpu_engine_requested

__all__ = ["CPUSGLangBackend", "A3POSGLangEngine", "server_command"]


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


class A3POSGLangEngine(RemoteSGLangEngine):
    """AReaL's ``RemoteSGLangEngine`` with ``CPUSGLangBackend``."""

    def __init__(self, config):
        super().__init__(config)
        self._engine.backend = CPUSGLangBackend()
