"""Running ``python -m areal_a3po.train`` as a user does, and making sure it leaves nothing behind.

Each run is a real AReaL experiment (``configs/cpu_tiny.yaml``): the controller, AReaL's workers, a
vLLM-CPU server and, with ``scheduler.type=ray``, a Ray head. It is started in a session of its own,
so that one ``killpg`` reaches every process it started, and with a ``PATH`` that does not hold the
venv (the run must launch its server with the venv's interpreter all the same).
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
CPU_TINY = REPO / "configs" / "cpu_tiny.yaml"
#: Words in the command line of every process an experiment starts (controller, workers, server, Ray).
RUN_PROCESS_WORDS = ("areal", "vllm", "ray", "raylet", "gcs_server", "rpc_server")
#: PATH without the venv: the system's python3 there has no vLLM.
BARE_PATH = "/usr/local/bin:/usr/bin:/bin"


def user_env(**extra: str) -> dict[str, str]:
    """This process's environment as a user's shell would have it: without the SPMD variables the
    in-process actor tests set (``toy.setup_single_process_env``: AREAL_SPMD_MODE, MASTER_PORT, …),
    which would put a run in SPMD mode on a port this process holds, and without RAY_ADDRESS."""
    from benchmarks.e2e_speedup import without_spmd_env

    env = {**without_spmd_env(os.environ), "PATH": BARE_PATH, **extra}
    env.pop("RAY_ADDRESS", None)
    return env


@dataclass
class Run:
    """One finished (or killed) run: its exit status, output and the stats AReaL committed."""

    returncode: int
    output_file: Path
    stats_file: Path | None
    killed: bool = False
    rows: list[dict] = field(default_factory=list)

    @property
    def output(self) -> str:
        return self.output_file.read_text(errors="replace")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-n:])

    def steps(self) -> list[int]:
        return [r["global_step"] for r in self.rows]

    def column(self, key: str) -> list[float | None]:
        return [r.get(key) for r in self.rows]


def stats_rows(path: Path | None) -> list[dict]:
    """The run's committed stats so far ([] before AReaL has written any)."""
    from benchmarks.e2e_speedup import read_stats

    return read_stats(path) if path is not None and path.exists() else []


def experiment_overrides(workdir: Path, trial: str) -> list[str]:
    """Overrides that keep a run's files (model, logs, checkpoints, name records) under ``workdir``."""
    return [
        f"cluster.fileroot={workdir}/fileroot",
        f"cluster.name_resolve.nfs_record_root={workdir}/name_resolve",
        f"trial_name={trial}",
    ]


def train(workdir: Path, trial: str, *overrides: str, kill_after_step: int | None = None, timeout: float = 420) -> Run:
    """Run ``python -m areal_a3po.train --config configs/cpu_tiny.yaml`` to the end, or SIGKILL its
    whole process group once AReaL has committed the stats of global step ``kill_after_step``."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"{trial}.out"
    # Stats of earlier legs of the same trial are in the same file: count them.
    pattern = f"{workdir}/fileroot/logs/*/*/{trial}/stats.jsonl"
    cmd = [sys.executable, "-m", "areal_a3po.train", "--config", str(CPU_TINY), *experiment_overrides(workdir, trial), *overrides]
    env = user_env(PYTHONUNBUFFERED="1")
    killed = False
    with open(out, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{trial}: no result after {timeout:.0f} s; output in {out}")
                if kill_after_step is not None:
                    files = glob.glob(pattern)
                    if files and any(r["global_step"] >= kill_after_step for r in stats_rows(Path(files[0]))):
                        os.killpg(proc.pid, signal.SIGKILL)
                        killed = True
                        proc.wait(timeout=30)
                        break
                time.sleep(0.2)
        finally:
            if proc.poll() is None or killed:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    files = glob.glob(pattern)
    stats_file = Path(files[0]) if files else None
    return Run(proc.returncode, out, stats_file, killed=killed, rows=stats_rows(stats_file))


def run_processes(since: float, exclude: set[int]) -> list[psutil.Process]:
    """Live processes created after ``since`` (not in ``exclude``) that belong to an experiment."""
    me = os.getpid()
    found = []
    for p in psutil.process_iter(["pid", "create_time", "cmdline", "status"]):
        info = p.info
        if info["pid"] in exclude or info["pid"] == me or (info["create_time"] or 0) < since:
            continue
        if info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(info["cmdline"] or [])
        if any(word in cmdline for word in RUN_PROCESS_WORDS):
            found.append(p)
    return found


@contextlib.contextmanager
def no_orphans():
    """Yield a list that, on exit, holds the experiment processes still alive after the block (which
    are then killed, so a failing test leaves nothing behind either). Assert it is empty."""
    since = time.time() - 1
    before = {p.pid for p in psutil.process_iter()}
    leftovers: list[str] = []
    try:
        yield leftovers
    finally:
        time.sleep(1)  # let SIGTERM'd processes finish exiting
        alive = run_processes(since, before)
        leftovers.extend(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:160]}" for p in alive)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
