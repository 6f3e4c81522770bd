"""``areal_a3po.sglang_cpu`` (the stand-in for sgl_kernel's library load) and how AReaL's rollout worker
gets to it (``areal_a3po.rollout_engines``, the engine classes ``A3POTrainer`` hands AReaL).

The stand-in is checked against a package built here that fails the way ``sgl_kernel`` 0.4.1 does on
a machine without a CUDA driver (its ``load_utils._load_architecture_specific_ops`` raises
ImportError, its ``__init__`` calls it at import), in fresh interpreters: so these tests run in
either venv; the check against the real SGLang runs where SGLang is installed (``.venv-sglang``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from areal_a3po import sglang_cpu

REPO = Path(__file__).resolve().parents[1]

LOAD_UTILS = '''
def _load_architecture_specific_ops():
    {body}
'''
INIT = '''
from sgl_kernel.load_utils import _load_architecture_specific_ops
common_ops = _load_architecture_specific_ops()
from sgl_kernel.kvcacheio import transfer_kv_all_layer
'''
FAILING = 'raise ImportError("\\n[sgl_kernel] CRITICAL: Could not load any common_ops library!\\n- ImportError: libcuda.so.1: cannot open shared object file: No such file or directory\\n- ModuleNotFoundError: No module named \'common_ops\'")'


def _fake_kernel(root: Path, body: str = FAILING) -> Path:
    pkg = root / "sgl_kernel"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(INIT)
    (pkg / "load_utils.py").write_text(LOAD_UTILS.format(body=body))
    (pkg / "kvcacheio.py").write_text("def transfer_kv_all_layer(*a):\n    raise RuntimeError('CUDA op')\n")
    return root


def _python(code: str, path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != sglang_cpu.CPU_ENGINE_ENV}
    environ.update(env, PYTHONPATH=os.pathsep.join([str(path), str(REPO)]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environ, timeout=120)


def test_without_the_stand_in_the_kernel_package_fails_at_import_as_sgl_kernel_does(tmp_path):
    out = _python("import sgl_kernel", _fake_kernel(tmp_path), SGLANG_USE_CPU_ENGINE="1")
    assert out.returncode != 0 and "libcuda.so.1" in out.stderr


def test_on_the_cpu_engine_the_package_imports_and_only_the_library_is_missing(tmp_path):
    out = _python("""
        import areal_a3po.sglang_cpu, sgl_kernel
        from sgl_kernel.kvcacheio import transfer_kv_all_layer   # the import SGLang's memory_pool_host makes
        print(type(sgl_kernel.common_ops).__name__, sgl_kernel.common_ops.reason)
        try:
            sgl_kernel.common_ops.anything
        except ImportError as exc:
            print("named:", exc)
    """, _fake_kernel(tmp_path), SGLANG_USE_CPU_ENGINE="1")
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first == "MissingKernelLibrary ImportError: libcuda.so.1: cannot open shared object file: No such file or directory"
    assert second.startswith("named: sgl_kernel's compiled library is not loaded on this machine (ImportError: libcuda.so.1")


def test_off_without_the_cpu_engine_and_a_loadable_library_is_loaded_as_before(tmp_path):
    off = _python("import areal_a3po.sglang_cpu as s, sys; print(s.installed()); import sgl_kernel", _fake_kernel(tmp_path / "a"))
    assert off.returncode != 0 and off.stdout.strip() == "False" and "libcuda.so.1" in off.stderr
    loads = _python("import areal_a3po.sglang_cpu, sgl_kernel; print(sgl_kernel.common_ops)",
                    _fake_kernel(tmp_path / "b", body="return 'the real library'"), SGLANG_USE_CPU_ENGINE="1")
    assert loads.returncode == 0 and loads.stdout.strip() == "the real library", loads.stderr


def test_the_server_gets_sleep_on_idle_unless_told_otherwise():
    assert sglang_cpu.server_argv(["--port", "1"], {}) == ["--port", "1", "--sleep-on-idle"]
    assert sglang_cpu.server_argv(["--sleep-on-idle"], {}) == ["--sleep-on-idle"]
    assert sglang_cpu.server_argv(["--port", "1"], {sglang_cpu.SLEEP_ON_IDLE_ENV: "0"}) == ["--port", "1"]


def _sglang_venv(code: str) -> subprocess.CompletedProcess:
    """``code`` in SGLang's venv (``make install``), with SGLang's CPU engine selected."""
    from helpers import SGLANG_PYTHON

    assert SGLANG_PYTHON.exists(), f"{SGLANG_PYTHON} is missing: `make install` builds .venv-sglang"
    environ = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([str(SGLANG_PYTHON), "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environ,
                          timeout=300, cwd=REPO)


@pytest.mark.sglang
def test_the_worker_launches_the_same_command_through_the_stand_in():
    out = _sglang_venv("""
        import json
        from areal.api.cli_args import SGLangConfig
        from areal_a3po.rollout_engines import server_command
        args = SGLangConfig.build_args(SGLangConfig(model_path="/m", attention_backend="torch_native"), tp_size=1, base_gpu_id=0, port=9)
        print(json.dumps([SGLangConfig.build_cmd_from_args(dict(args)), server_command(dict(args))]))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    theirs, ours = json.loads(out.stdout.splitlines()[-1])
    assert ours[:3] == ["python3", "-m", "areal_a3po.sglang_cpu"] and ours[3:] == theirs[2:]  # then AReaL's module


def test_the_cpu_engine_is_read_from_the_rollouts_env_vars_first():
    from areal_a3po.sglang_cpu import rollout_cpu_engine as sglang_cpu_engine

    spec = lambda env: SimpleNamespace(scheduling_spec=[SimpleNamespace(env_vars=env)])  # noqa: E731
    assert sglang_cpu_engine(spec({"SGLANG_USE_CPU_ENGINE": "1"}), environ={})
    assert not sglang_cpu_engine(spec({"SGLANG_USE_CPU_ENGINE": "0"}), environ={"SGLANG_USE_CPU_ENGINE": "1"})
    assert sglang_cpu_engine(spec({}), environ={"SGLANG_USE_CPU_ENGINE": "1"})
    assert not sglang_cpu_engine(spec({}), environ={})


@pytest.mark.sglang
def test_sglangs_server_modules_import_on_this_cpu_with_the_stand_in():
    out = _sglang_venv("""
        import areal_a3po.sglang_cpu, sgl_kernel
        import sglang.srt.mem_cache.memory_pool_host
        from areal.experimental.inference_service.sglang import launch_server
        print(type(sgl_kernel.common_ops).__name__)
    """)
    assert out.returncode == 0 and out.stdout.strip().endswith("MissingKernelLibrary"), out.stderr[-2000:]


def _sglang_config(env: dict):
    return SimpleNamespace(rollout=SimpleNamespace(scheduling_spec=[SimpleNamespace(env_vars=env)]),
                           sglang=SimpleNamespace(attention_backend="torch_native", mem_fraction_static=0.05))


def test_areals_sglang_pin_is_read_from_its_metadata():
    from areal_a3po.preflight import areal_sglang_pin

    assert areal_sglang_pin() == "0.5.10.post1"  # areal 1.0.4: sglang[tracing]==0.5.10.post1


@pytest.mark.sglang
def test_the_preflight_names_each_thing_sglang_lacks_on_a_cpu_only_machine():
    out = _sglang_venv("""
        from types import SimpleNamespace
        from areal_a3po.preflight import PreflightError, preflight_sglang
        def config(env, attention="torch_native", fraction=0.05):
            return SimpleNamespace(rollout=SimpleNamespace(scheduling_spec=[SimpleNamespace(env_vars=env)]),
                                   sglang=SimpleNamespace(attention_backend=attention, mem_fraction_static=fraction))
        preflight_sglang(config({"SGLANG_USE_CPU_ENGINE": "1"}), "sglang:d1p1t1", environ={}, cuda=False)
        preflight_sglang(config({}, attention="fa3", fraction=0.9), "sglang:d1p1t1", environ={}, cuda=True)  # GPUs: AReaL's defaults
        try:
            preflight_sglang(config({}, attention="fa3", fraction=0.9), "sglang:d1p1t1", environ={}, cuda=False)
        except PreflightError as exc:
            print(str(exc).replace("\\n", " "))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SGLANG_USE_CPU_ENGINE" in out.stdout and "sglang.attention_backend='fa3'" in out.stdout
    assert "sglang.mem_fraction_static=0.9" in out.stdout


def test_without_sglang_the_preflight_says_which_venv_has_it(monkeypatch):
    import importlib.util

    from areal_a3po import preflight

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sglang" else real(name, *a))
    with pytest.raises(preflight.PreflightError, match=r"needs SGLang, which .* cannot import.*\.venv-sglang"):
        preflight.preflight_sglang(_sglang_config({}), "sglang:d1p1t1", environ={}, cuda=False)
