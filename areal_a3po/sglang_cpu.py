"""SGLang on a CPU-only machine as AReaL's rollout server: a stand-in for one call of ``sgl_kernel``.

What it replaces, and why. SGLang 0.5.10.post1 (the release AReaL 1.0.4 pins) has a CPU engine
(``SGLANG_USE_CPU_ENGINE=1``: norms, activations, rotary embedding and, with
``--attention-backend torch_native``, attention all in plain torch), but it cannot start on a machine
without a CUDA driver: ``sglang/srt/mem_cache/memory_pool_host.py`` imports ``sgl_kernel.kvcacheio``
unconditionally, importing the package ``sgl_kernel`` (``sglang-kernel`` 0.4.1 on PyPI, CUDA builds
only) runs ``common_ops = _load_architecture_specific_ops()`` (``sgl_kernel/__init__.py``), and that
function (``sgl_kernel/load_utils.py``) loads the compiled ``sm100/common_ops.abi3.so``, which needs
``libcuda.so.1``: ``ImportError: libcuda.so.1: cannot open shared object file``. Nothing else of
``sgl_kernel`` needs the library at import: its Python modules only call ``torch.ops.sgl_kernel.*``
when an op runs, and the CPU engine runs none of them.

So this module replaces exactly that one function, and only where it fails: an import hook (a
meta-path finder, ``KernelLibraryStandIn``) lets Python load the installed ``sgl_kernel/load_utils.py``
as usual and then wraps its ``_load_architecture_specific_ops``: the real loader runs first; if it
raises ``ImportError`` (no CUDA driver), the package gets ``MissingKernelLibrary`` as its
``common_ops`` instead, and every other line of ``sgl_kernel`` runs unchanged. A CUDA op called
anyway fails when called (``torch.ops.sgl_kernel`` has no such op), not at import. Nothing on disk is
modified and nothing of ``sgl_kernel`` is copied.

When it is active. Only in a process whose environment asks SGLang for its CPU engine
(``SGLANG_USE_CPU_ENGINE=1``, the switch SGLang itself reads in ``sglang.srt.utils.common.is_cpu``),
and only once the process runs this module: ``python3 -m areal_a3po.sglang_cpu <AReaL's server module>
<SGLang server arguments>`` is the server command on CPU (``areal_a3po.rollout_engines`` makes AReaL's
rollout worker run it instead of ``python3 -m <AReaL's server module> <arguments>``; the module is
``areal.experimental.inference_service.sglang.launch_server`` in AReaL 1.0.4,
``areal.v2.inference_service.sglang.launch_server`` in 2.0.0). It installs the hook, adds
``--sleep-on-idle`` (an idle SGLang scheduler otherwise polls at 100% of a core; AReaL's
``SGLangConfig`` has no key for it; ``A3PO_SGLANG_SLEEP_ON_IDLE=0`` keeps SGLang's default) and runs
AReaL's module as ``__main__``. SGLang starts its scheduler and detokenizer with
multiprocessing's ``spawn``, which re-imports the main module in each child: this module stays the
main module (``runpy`` with ``alter_sys=False``), so the hook is installed in those children too.
On a GPU machine (no ``SGLANG_USE_CPU_ENGINE``) none of this runs.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import types

logger = logging.getLogger("areal_a3po.sglang_cpu")

#: The environment variable (and value) that selects SGLang's CPU engine.
CPU_ENGINE_ENV = "SGLANG_USE_CPU_ENGINE"
#: AReaL 1.0.4's SGLang server module (``SGLangConfig.build_cmd_from_args``), run when none is named.
AREAL_SERVER_MODULE = "areal.experimental.inference_service.sglang.launch_server"
#: This module: the server command on CPU.
SERVER_MODULE = "areal_a3po.sglang_cpu"
#: ``0`` keeps SGLang's busy-polling idle scheduler (default here: ``--sleep-on-idle``).
SLEEP_ON_IDLE_ENV = "A3PO_SGLANG_SLEEP_ON_IDLE"

_TARGET = "sgl_kernel.load_utils"
_FUNCTION = "_load_architecture_specific_ops"


def rollout_cpu_engine(rollout_config, environ=os.environ) -> bool:
    """Whether the rollout's SGLang server runs SGLang's CPU engine: ``SGLANG_USE_CPU_ENGINE=1`` in
    ``rollout.scheduling_spec[0].env_vars`` (what the worker and its server get) or, where that does not
    say, in this process's environment (which AReaL's local scheduler passes on)."""
    specs = getattr(rollout_config, "scheduling_spec", None) or ()
    env = dict(getattr(specs[0], "env_vars", None) or {}) if specs else {}
    return cpu_engine_requested(env if CPU_ENGINE_ENV in env else environ)


def cpu_engine_requested(environ=os.environ) -> bool:
    """Whether ``environ`` selects SGLang's CPU engine (what ``sglang.srt.utils.common.is_cpu`` reads)."""
    return environ.get(CPU_ENGINE_ENV, "0") == "1"


class MissingKernelLibrary(types.ModuleType):
    """``sgl_kernel.common_ops`` where its compiled library could not be loaded (no CUDA driver).

    ``sgl_kernel`` keeps the loaded library in ``common_ops`` and never reads an attribute of it; one
    read anyway fails here, naming the reason, rather than with an ``AttributeError`` far away."""

    def __init__(self, reason: BaseException):
        super().__init__("common_ops", "sgl_kernel's compiled library, not loaded (areal_a3po.sglang_cpu)")
        # sgl_kernel's error lists each attempt ("- ImportError: libcuda.so.1: ..."); the first says why
        attempts = [line[2:] for line in str(reason).splitlines() if line.startswith("- ")]
        self.reason = attempts[0] if attempts else f"{type(reason).__name__}: {reason}"

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"sgl_kernel's compiled library is not loaded on this machine ({self.reason}), "
                          f"so sgl_kernel.common_ops.{name} does not exist; SGLang's CPU engine does not use it.")


def _or_stand_in(load_library):
    """``load_library`` (sgl_kernel's loader), returning ``MissingKernelLibrary`` when it raises ImportError."""

    def load():
        try:
            return load_library()
        except ImportError as exc:
            stand_in = MissingKernelLibrary(exc)
            logger.info("sgl_kernel: compiled library not loaded (%s); its Python modules import without it "
                        "(SGLang's CPU engine runs none of its CUDA ops).", stand_in.reason)
            return stand_in

    load.__wrapped__ = load_library
    load.__doc__ = f"sgl_kernel's {_FUNCTION}, or MissingKernelLibrary where it raises ImportError (areal_a3po.sglang_cpu)."
    return load


class _LoadUtilsLoader(importlib.machinery.SourceFileLoader):
    """Loads the installed ``sgl_kernel/load_utils.py`` as Python would, then wraps its library loader."""

    def exec_module(self, module):
        super().exec_module(module)
        setattr(module, _FUNCTION, _or_stand_in(getattr(module, _FUNCTION)))


class KernelLibraryStandIn(importlib.abc.MetaPathFinder):
    """Meta-path finder for ``sgl_kernel.load_utils`` only: the module found where Python would find
    it, executed by ``_LoadUtilsLoader``. Every other import is left to the next finder."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec  # not a plain source file (a zip, a compiled build): leave it alone
        return importlib.util.spec_from_file_location(fullname, spec.origin, loader=_LoadUtilsLoader(fullname, spec.origin))


def installed() -> bool:
    return any(isinstance(f, KernelLibraryStandIn) for f in sys.meta_path)


def install(environ=os.environ) -> bool:
    """Put ``KernelLibraryStandIn`` first on ``sys.meta_path`` when ``environ`` selects SGLang's CPU
    engine; True when it is (now or already) installed. Too late once ``sgl_kernel`` is imported."""
    if not cpu_engine_requested(environ):
        return False
    if not installed():
        if "sgl_kernel" in sys.modules:
            logger.warning("sgl_kernel is already imported; the stand-in for its library comes too late")
            return False
        sys.meta_path.insert(0, KernelLibraryStandIn())
    return True


def server_argv(argv: list[str], environ=os.environ) -> list[str]:
    """SGLang's server arguments on CPU: ``argv`` plus ``--sleep-on-idle`` unless it is there or
    ``A3PO_SGLANG_SLEEP_ON_IDLE=0``."""
    if environ.get(SLEEP_ON_IDLE_ENV, "1") != "0" and "--sleep-on-idle" not in argv:
        return [*argv, "--sleep-on-idle"]
    return list(argv)


# Installed at import, so that SGLang's spawned children (which re-import the main module) have it too.
install()

if __name__ == "__main__":
    import runpy

    module = sys.argv.pop(1) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else AREAL_SERVER_MODULE
    if cpu_engine_requested():
        sys.argv[1:] = server_argv(sys.argv[1:])
    runpy.run_module(module, run_name="__main__", alter_sys=False)
