"""The GPU acceptance command (``benchmarks.gpu_acceptance``), proven on CPU by its dry run.

The dry run is the GPU run's code with gloo instead of NCCL, the tiny shape instead of Qwen2.5-1.5B's
and float32: AReaL's FSDP actor through the plugin, its audit, fallback and stats export under the
guard that refuses tensors not on the group's device, and AReaL's compute_logp / ppo_update timed
for recompute and a3po, beside gpu_phases. It runs in a process of its own (a process group is
global state), as a user runs it.
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.harness.launch import REPO, without_spmd_env

pytestmark = pytest.mark.integration


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_acceptance", *args], cwd=REPO,
                          env=without_spmd_env(os.environ), capture_output=True, text=True, timeout=timeout)


def test_the_dry_run_checks_collectives_audit_fallback_export_and_times_both_methods(tmp_path):
    out = tmp_path / "gpu_acceptance.json"
    proc = _run("--dry-run", "--repeats", "1", "--budget", "240", "--json", str(out), timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "ACCEPTED in" in proc.stdout and "recompute share R/(R+T)" in proc.stdout
    res = json.loads(out.read_text())
    assert (res["mode"], res["backend"], res["ok"]) == ("dry-run", "gloo", True)
    assert res["elapsed_seconds"] < res["budget_seconds"]

    # 1. gloo takes the CPU tensor NCCL refuses; the guard names a tensor from another device.
    col = res["checks"]["collectives"]
    assert col["ok"] and col["native_refusal"] is None and col["on_device_all_reduce"] == 1.0
    assert "dist.all_reduce: 'tensor' is on meta, but the group's backend 'gloo' takes tensors on cpu" in col["guard_refusal"]

    # 2. The fallback switches on planted drift and back on a clean batch; every export on the group's device.
    plug = res["checks"]["plugin"]
    assert plug["ok"] and plug["fallback_switched"] and plug["recovered"] and plug["export_on_group_device"]
    drift, clean = plug["steps"]
    threshold = plug["fallback"]["threshold"]
    assert (drift["mode_before"], drift["mode_after"], drift["recompute_mode"]) == ("approximate", "recompute", 0.0)
    assert (clean["mode_before"], clean["mode_after"], clean["recompute_mode"]) == ("recompute", "approximate", 1.0)
    assert drift["fallback_value"] > 10 * threshold and clean["fallback_value"] < threshold / 10
    assert any("A-3PO fallback at step 3" in w for w in drift["warnings"])
    assert any("A-3PO recovered at step 4" in w for w in clean["warnings"])
    for step in (drift, clean):
        assert step["tracker_devices"] == ["cpu"] and set(step["collectives"]) == {"gloo:cpu"}
        assert step["audit_keys"] > 20 and step["audit_finite"]
    empty = plug["empty_minibatch"]
    assert empty["on_engine_device"]["keys"] > 0 and empty["on_engine_device"]["tokens"] == 0.0
    assert empty["on_other_device"] == "meta" and empty["refused"].startswith("CollectiveDeviceError: dist.all_reduce")

    # 3. AReaL's phases, recompute against a3po: a3po runs no recompute forward.
    t = res["timing"]
    assert t["repeats"] == 1 and t["warmup_pairs"] == 1 and t["seqs"] == 8 and t["max_tokens_per_mb"] == 128
    assert all(t[k]["median"] > 0 for k in ("recompute_logp", "update_recompute", "update_a3po"))
    assert 0 < t["recompute_share"]["median"] < 1
    assert all("recompute_logp" in r for r in t["phases"]["recompute"])
    assert not any("recompute_logp" in r for r in t["phases"]["a3po-paper"])

    # 4. gpu_phases on the same machine, beside it.
    g = res["gpu_phases"]
    assert g["shape"] == "tiny" and 0 < g["recompute_share"] < 1


def test_without_a_gpu_the_gpu_run_says_so():
    proc = _run("--budget", "30", timeout=120)
    assert proc.returncode != 0
    assert "no CUDA device is visible here; run it on a GPU machine, or with --dry-run" in proc.stderr
