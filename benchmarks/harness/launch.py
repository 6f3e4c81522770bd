"""Launching a real run (``python -m benchmarks.harness.train`` or ``areal_a3po.train``) and watching it.

``launch`` starts the command in a session of its own (one ``killpg`` reaches every process the run
starts: AReaL's workers, the inference server, a Ray head), its output in a log file, and polls the
stats the run commits (``stats.jsonl``, written by ``benchmarks.harness.train``) for a progress bar,
an optional kill after a given step, and (``watch_cores``) the cores each part of the run may use.
The benchmarks (``e2e_speedup``, ``mismatch``) and the pipeline tests all launch through it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

REPO = Path(__file__).resolve().parents[2]


def read_stats(path: str | os.PathLike) -> list[dict]:
    """The committed stats rows; a line that does not parse is skipped: the one AReaL is still
    writing while a run is being watched, or the last one of a run that was killed."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


@dataclass
class Run:
    """One finished (or killed) run: exit status, its output, the stats it committed, its cores."""

    returncode: int
    log_file: Path
    stats_file: Path | None
    killed: bool = False
    rows: list[dict] = field(default_factory=list)
    cores: dict[str, list[int]] = field(default_factory=dict)
    #: Seconds from the kill (``kill_when``) to the end of the run; None when nothing was killed.
    ended_after_kill: float | None = None

    @property
    def output(self) -> str:
        return self.log_file.read_text(errors="replace")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-n:])

    def steps(self) -> list[int]:
        return [r["global_step"] for r in self.rows]


#: What a run is doing before its first committed step, told by a line of its output (the last seen wins).
PHASES = (
    (b"Launching vLLM server", "starting the inference server"),
    (b"Launching SGLang server", "starting the inference server"),
    (b"Servers are all ready", "first step: warm-up"),
)
STARTING = "starting AReaL's workers"


class _Phase:
    """The phase of a run, from the new part of its output at each poll (for the progress bar)."""

    def __init__(self, log_file: Path):
        self.log_file, self.offset, self.name = log_file, log_file.stat().st_size, STARTING

    def poll(self, steps: int) -> str:
        with open(self.log_file, "rb") as f:
            f.seek(self.offset)
            text = f.read()
        self.offset += len(text)
        for marker, name in PHASES:
            if marker in text:
                self.name = name
        return "training" if steps else self.name


def _stats_file(stats: str | os.PathLike) -> Path | None:
    found = glob.glob(str(stats))
    return Path(found[0]) if found else None


def launch(
    command: list[str],
    *,
    log_file: Path,
    stats: str | os.PathLike,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    kill_after_step: int | None = None,
    kill_when: Callable[[list[dict]], bool] | None = None,
    kill: Callable[[psutil.Process, int], bool] | None = None,
    kill_signal: int = signal.SIGKILL,
    timeout: float | None = None,
    progress: tuple[str, int] | None = None,
    watch_cores: bool = False,
) -> Run:
    """Run ``command`` to its end, or SIGKILL its whole process group once the stats of global step
    ``kill_after_step`` are committed (or once ``kill_when(rows)`` holds for the committed stats);
    ``TimeoutError`` after ``timeout`` seconds (the run is killed).
    With ``kill`` (e.g. ``worker("actor", 1)``, or ``controller`` with ``kill_signal=SIGTERM``), send
    ``kill_signal`` only to the run's processes it matches at that point (the step after it is under
    way), and watch the run end by itself.

    ``stats``: the run's ``stats.jsonl`` (a glob pattern is allowed). Stats of earlier legs of the
    same trial (a recovered run) are in the same file: ``kill_after_step`` counts them too.
    ``progress``: (label, total steps) for a tqdm bar whose label says what the run is doing until its
    first step (starting workers, starting the inference server, warm-up). ``watch_cores``: read ``thread_cores`` once
    two steps are committed. The log file is appended to, each leg headed by its command line.
    """
    from tqdm import tqdm

    log_file.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=progress[1], desc=progress[0], unit="step", leave=True) if progress else None
    killed, cores, killed_at = False, {}, None
    if kill_when is None and kill_after_step is not None:
        kill_when = lambda rows: any(r["global_step"] >= kill_after_step for r in rows)  # noqa: E731
    deadline = time.monotonic() + timeout if timeout else None
    with open(log_file, "ab") as log:
        log.write(("$ " + " ".join(command) + "\n").encode())
        log.flush()
        phase = _Phase(log_file)
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                path = _stats_file(stats)
                rows = read_stats(path) if path else []
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(_timeout_report(command, timeout, log_file, phase.poll(len(rows)), rows, killed_at))
                if bar is not None:
                    desc = f"{progress[0]} ({phase.poll(len(rows))})"
                    if desc != bar.desc:
                        bar.set_description_str(desc)
                    if len(rows) != bar.n:
                        bar.update(len(rows) - bar.n)
                if watch_cores and len(rows) >= 2 and not cores:
                    cores = thread_cores(proc.pid)
                if not killed and kill_when is not None and kill_when(rows):
                    killed, killed_at = True, time.monotonic()
                    if kill is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                        break
                    _kill_matching(proc.pid, kill, kill_signal)
                time.sleep(0.2)
        finally:
            if proc.poll() is None or (killed and kill is None):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    ended_after_kill = time.monotonic() - killed_at if killed_at is not None else None
    path = _stats_file(stats)
    rows = read_stats(path) if path else []
    if bar is not None:
        bar.set_description_str(f"{progress[0]} ({'done' if proc.returncode == 0 else f'exit {proc.returncode}'})")
        bar.update(len(rows) - bar.n)
        bar.close()
    return Run(proc.returncode, log_file, path, killed=killed, rows=rows, cores=cores, ended_after_kill=ended_after_kill)


def _timeout_report(command: list[str], timeout: float, log_file: Path, phase: str, rows: list[dict],
                    killed_at: float | None, lines: int = 25) -> str:
    """What a run that did not end in time was doing: its phase, the steps it committed, how long ago
    it was signalled, and the end of its output (a CI log then says where it stood)."""
    where = f"{phase}, {len(rows)} step(s) committed"
    if killed_at is not None:
        where += f", signalled {time.monotonic() - killed_at:.0f} s ago and still running"
    tail = log_file.read_text(errors="replace").splitlines()[-lines:]
    return (f"{' '.join(command[:4])}...: no result after {timeout:.0f} s ({where}); output in {log_file}; "
            "its last lines:\n" + "\n".join(f"    {line[:200]}" for line in tail))


def worker(role: str, index: int) -> Callable[[psutil.Process, int], bool]:
    """Matches AReaL's worker process ``role/index`` (``worker("actor", 1)``: trainer rank 1)."""

    def match(proc: psutil.Process, root_pid: int) -> bool:
        argv = proc.cmdline()
        return "rpc_server" in " ".join(argv) and _arg(argv, "--role") == role and _arg(argv, "--worker-index") == str(index)

    return match


def _arg(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


def inference_server(proc: psutil.Process, root_pid: int) -> bool:
    """Matches the run's inference server, started by the rollout worker: vLLM's (AReaL's
    ``areal_vllm_server``) or SGLang's HTTP process (AReaL's ``...sglang.launch_server`` module, run
    through ``areal_a3po.sglang_cpu`` on CPU; its scheduler exits with it)."""
    argv = " ".join(proc.cmdline())
    server = "areal_vllm_server" in argv or "sglang.launch_server" in argv
    return server and "rpc_server" not in argv and "multiprocessing" not in argv


def controller(proc: psutil.Process, root_pid: int) -> bool:
    """Matches the command ``launch`` started (the run's controller): what a scheduler or ``kill`` signals."""
    return proc.pid == root_pid


def _kill_matching(root_pid: int, match: Callable[[psutil.Process, int], bool], sig: int) -> None:
    root = psutil.Process(root_pid)
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            if match(proc, root_pid) and os.path.basename(proc.cmdline()[0]) not in LOG_PLUMBING:
                proc.send_signal(sig)


#: Variables that put AReaL in SPMD mode (one process per rank) or pick a rendezvous port; a run
#: launched here is a single-controller run and chooses its own.
SPMD_ENV = ("AREAL_SPMD_MODE", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def without_spmd_env(environ) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k not in SPMD_ENV}


#: Programs of the shell pipeline AReaL wraps each worker in (they only copy its output to log files).
LOG_PLUMBING = ("bash", "sh", "tee", "sed", "stdbuf")


def thread_cores(root_pid: int) -> dict[str, list[int]]:
    """Cores each part of a running experiment may use, read from every thread's ``Cpus_allowed_list``.

    Parts: the trainer (AReaL's worker with ``--role actor`` and everything under it), the server
    side (the rollout workers, the vLLM server and its engine processes), the controller, and the
    shell pipeline that copies each worker's output to its log files.
    """

    def role(proc) -> str:
        if os.path.basename((proc.cmdline() or [""])[0]) in LOG_PLUMBING:
            return "log plumbing"  # AReaL's `bash -c '... | tee ... >(sed ...)'` around each worker
        for p in [proc, *proc.parents()]:
            argv = p.cmdline()
            if "--role" in argv[:-1]:
                return "trainer" if argv[argv.index("--role") + 1] == "actor" else "server"
            if any("areal_vllm_server" in a for a in argv):
                return "server"
            if p.pid == root_pid:
                return "controller"
        return "other"

    cores: dict[str, set[int]] = {}
    try:
        procs = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    for proc in procs:
        try:
            r = role(proc)
            for task in Path(f"/proc/{proc.pid}/task").iterdir():
                text = (task / "status").read_text()
                allowed = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Cpus_allowed_list"))
                cores.setdefault(r, set()).update(_cpu_list(allowed))
        except (psutil.Error, OSError, StopIteration):
            continue
    return {k: sorted(v) for k, v in cores.items()}


def _cpu_list(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out
