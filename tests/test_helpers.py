"""The tests' own process helpers (``helpers.no_orphans``, ``helpers.run_ranks``) on plain Python processes.

This module imports nothing heavy: ``run_ranks`` spawns fresh interpreters that import it.
"""

import multiprocessing
import os
import subprocess
import sys
import time

import psutil
import pytest

import helpers
from helpers import Raised, run_ranks

SLEEPER = "import time; time.sleep(60)"


def test_no_orphans_reports_and_stops_what_the_block_left_running(monkeypatch):
    monkeypatch.setattr(helpers, "GRACE_SECONDS", 1)
    with helpers.no_orphans() as leftovers:
        # A child of this process, and a process orphaned at once (its shell exits and it is reparented:
        # found by the variable it inherited). "areal" in their command lines, as in every run process's.
        child = subprocess.Popen([sys.executable, "-c", SLEEPER, "areal"])
        subprocess.run(["sh", "-c", f"{sys.executable} -c '{SLEEPER}' areal-orphan &"], check=True)
        subprocess.run([sys.executable, "-c", "pass", "areal"], check=True)  # ended: not a leftover
    assert len(leftovers) == 2 and sum("areal-orphan" in line for line in leftovers) == 1, leftovers
    assert child.wait(timeout=15) is not None  # stopped by no_orphans
    pids = [int(line.split(":")[0]) for line in leftovers]
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    with helpers.no_orphans() as leftovers:
        pass
    assert leftovers == []


def _rank(rank, world, how):
    if rank == 1 and how == "raise":
        raise ValueError("rank 1 says no")
    if rank == 1 and how == "die":
        os._exit(7)
    if rank == 1 and how == "hang":
        time.sleep(120)
    return rank * 10 + world


def test_run_ranks_collects_results_and_errors_and_ends_dead_and_hung_ranks():
    assert run_ranks(_rank, "ok", timeout=120) == [2, 12]
    assert run_ranks(_rank, "raise", timeout=120) == [2, Raised("ValueError", "rank 1 says no")]
    with pytest.raises(AssertionError, match=r"rank\(s\) \[1\] exited with \[7\] without a result"):
        run_ranks(_rank, "die", timeout=120)
    start = time.monotonic()
    hung = r"rank\(s\) \[(0, )?1\] gave no result within 5 s \(waiting in a collective"
    with pytest.raises(AssertionError, match=hung):
        run_ranks(_rank, "hang", timeout=5)
    assert time.monotonic() - start < 60  # the hung rank was stopped (after its 10 s to end by itself), not awaited
    assert not multiprocessing.active_children()  # every rank ended and reaped by multiprocessing


def test_train_passes_launch_what_to_kill_and_when(tmp_path, monkeypatch):
    # The pipeline tests' calls, as launch receives them (nothing is run).
    import signal

    from benchmarks.harness.launch import Kill, controller, inference_server, worker

    seen = []
    monkeypatch.setattr(helpers, "launch", lambda cmd, **kwargs: seen.append(kwargs["kill"]))
    helpers.train(tmp_path, "a", "total_train_steps=6", kill_after_step=1, kill=inference_server)
    helpers.train(tmp_path, "b", kill_after_step=2)
    stale = worker("actor", 1)
    helpers.train(tmp_path, "c", kill_when=len, kill=stale)
    helpers.train(tmp_path, "d", kill_when=len, kill=controller, kill_signal=signal.SIGTERM)
    helpers.train(tmp_path, "e", kill=inference_server)  # no condition: nothing is killed
    after_one, after_two, *rest = seen
    assert (after_one.match, after_one.signum) == (inference_server, signal.SIGKILL)
    assert after_one.when([{"global_step": 0}]) is False and after_one.when([{"global_step": 0}, {"global_step": 1}])
    assert after_two.match is None and not after_two.when([{"global_step": 1}]) and after_two.when([{"global_step": 2}])
    assert rest == [Kill(len, stale, signal.SIGKILL), Kill(len, controller, signal.SIGTERM), None]
