"""Launching a real run (``python -m benchmarks.harness.train`` or ``areal_a3po.train``) and watching it.

``launch`` starts the command in a session of its own (one ``killpg`` reaches every process the run
starts: AReaL's workers, the inference server, a Ray head), its output in a log file, and looks at
the stats the run commits (``stats.jsonl``, written by ``benchmarks.harness.train``) every
``POLL_SECONDS`` for a progress bar, a ``Kill`` (what to kill and when) and (``watch_cores``) the
cores each part of the run may use. The benchmarks (``e2e_speedup``, ``mismatch``, ``share``) and
the pipeline tests all launch through it; ``wait_until`` is the one polling loop of the harness and
the tests.
"""

from __future__ import annotations

import contextlib
import functools
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
#: Seconds between two looks at a launched run.
POLL_SECONDS = 0.2


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


def _committed(stats: str | os.PathLike) -> tuple[Path | None, list[dict]]:
    """The stats file (the first match of the pattern ``stats``) and its rows ([] before it exists)."""
    found = glob.glob(str(stats))
    path = Path(found[0]) if found else None
    return path, read_stats(path) if path else []


def wait_until(done: Callable[[], bool], *, timeout: float | None, interval: float) -> bool:
    """Call ``done()`` every ``interval`` seconds until it returns True (then True), or until ``timeout``
    seconds have passed (then False; ``None``: no limit). ``done`` runs at least once."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not done():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


@dataclass
class Run:
    """One finished (or killed) run: exit status, its output, the stats it committed, its cores."""

    returncode: int
    log_file: Path
    stats_file: Path | None
    killed: bool = False
    rows: list[dict] = field(default_factory=list)
    cores: dict[str, list[int]] = field(default_factory=dict)
    #: Seconds from the kill (``Kill.when``) to the end of the run; None when nothing was killed.
    ended_after_kill: float | None = None

    @property
    def output(self) -> str:
        return self.log_file.read_text(errors="replace")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-n:])

    def steps(self) -> list[int]:
        return [r["global_step"] for r in self.rows]


# --- What to kill, and when ---

#: Matches some of a run's processes: ``match(process, pid of the command launch started)``.
Matcher = Callable[[psutil.Process, int], bool]


@dataclass(frozen=True)
class Kill:
    """What to kill in a watched run, and when: the first time ``when(rows)`` holds for the stats the
    run has committed, either

    - ``match`` is None: SIGKILL the run's whole process group and stop watching (the run is over), or
    - send ``signum`` once to the run's processes that ``match`` accepts (``worker("actor", 1)``,
      ``inference_server``, ``controller``) and watch the run end by itself.
    """

    when: Callable[[list[dict]], bool]
    match: Matcher | None = None
    signum: int = signal.SIGKILL

    @classmethod
    def after_step(cls, step: int, match: Matcher | None = None, signum: int = signal.SIGKILL) -> Kill:
        """Once the stats of global step ``step`` (or a later one) are committed."""
        return cls(functools.partial(_reached, step), match, signum)


def _reached(step: int, rows: list[dict]) -> bool:
    return any(r["global_step"] >= step for r in rows)


def worker(role: str, index: int) -> Matcher:
    """Matches AReaL's worker process ``role/index`` (``worker("actor", 1)``: trainer rank 1)."""

    def match(proc: psutil.Process, root_pid: int) -> bool:
        argv = proc.cmdline()
        return ("rpc_server" in " ".join(argv) and _arg(argv, "--role") == role
                and _arg(argv, "--worker-index") == str(index))

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


#: Programs of the shell pipeline AReaL wraps each worker in (they only copy its output to log files).
LOG_PLUMBING = ("bash", "sh", "tee", "sed", "stdbuf")


def process_tree(root_pid: int) -> list[psutil.Process]:
    """The command ``launch`` started and every live process below it (``areal_a3po.processes``)."""
    from areal_a3po.processes import alive, descendants  # on use: importing areal_a3po imports torch

    try:
        root = [(root_pid, psutil.Process(root_pid).create_time())]
    except psutil.Error:
        root = []
    return alive(root + descendants(root_pid))


def signal_matching(root_pid: int, match: Matcher, signum: int) -> None:
    """Send ``signum`` to the processes of the run started as ``root_pid`` that ``match`` accepts, not
    to the shell pipeline that copies a worker's output to its logs (``LOG_PLUMBING``)."""
    for proc in process_tree(root_pid):
        with contextlib.suppress(psutil.Error):
            if match(proc, root_pid) and os.path.basename(proc.cmdline()[0]) not in LOG_PLUMBING:
                proc.send_signal(signum)


# --- Launching and watching ---

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


class _Watch:
    """A launched run, looked at once per poll: its stats, the progress bar, its cores, the kill."""

    def __init__(self, proc: subprocess.Popen, log_file: Path, phase: _Phase, stats: str | os.PathLike,
                 kill: Kill | None, progress: tuple[str, int] | None, watch_cores: bool):
        self.proc, self.log_file, self.phase, self.stats = proc, log_file, phase, stats
        self.kill, self.watch_cores = kill, watch_cores
        self.label = progress[0] if progress else ""
        self.bar = _bar(*progress) if progress else None
        self.rows: list[dict] = []
        self.cores: dict[str, list[int]] = {}
        self.killed_at: float | None = None  # time.monotonic() of the kill

    @property
    def group_killed(self) -> bool:
        return self.killed_at is not None and self.kill.match is None

    def poll(self) -> bool:
        """One look at the run; True once it is over (it ended, or its process group was killed)."""
        if self.proc.poll() is not None:
            return True
        _, self.rows = _committed(self.stats)
        if self.bar is not None:
            self._show(self.phase.poll(len(self.rows)))
        if self.watch_cores and len(self.rows) >= 2 and not self.cores:
            self.cores = thread_cores(self.proc.pid)
        if self.kill is not None and self.killed_at is None and self.kill.when(self.rows):
            self.killed_at = time.monotonic()
            if self.kill.match is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                return True
            signal_matching(self.proc.pid, self.kill.match, self.kill.signum)
        return False

    def _show(self, doing: str) -> None:
        desc = f"{self.label} ({doing})"
        if desc != self.bar.desc:
            self.bar.set_description_str(desc)
        if len(self.rows) != self.bar.n:
            self.bar.update(len(self.rows) - self.bar.n)

    def timeout_report(self, command: list[str], timeout: float, lines: int = 25) -> str:
        """What a run that did not end in time was doing: its phase, the steps it committed, how long ago
        it was signalled, and the end of its output (a CI log then says where it stood)."""
        where = f"{self.phase.poll(len(self.rows))}, {len(self.rows)} step(s) committed"
        if self.killed_at is not None:
            where += f", signalled {time.monotonic() - self.killed_at:.0f} s ago and still running"
        tail = self.log_file.read_text(errors="replace").splitlines()[-lines:]
        return (f"{' '.join(command[:4])}...: no result after {timeout:.0f} s ({where}); output in {self.log_file}; "
                "its last lines:\n" + "\n".join(f"    {line[:200]}" for line in tail))

    def result(self) -> Run:
        """The ended run (its stats read once more); the bar says how it ended."""
        ended_after_kill = time.monotonic() - self.killed_at if self.killed_at is not None else None
        path, self.rows = _committed(self.stats)
        returncode = self.proc.returncode
        if self.bar is not None:
            self._show("done" if returncode == 0 else f"exit {returncode}")
            self.bar.close()
        return Run(returncode, self.log_file, path, killed=self.killed_at is not None, rows=self.rows, cores=self.cores,
                   ended_after_kill=ended_after_kill)


def _bar(label: str, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="step", leave=True)


def launch(
    command: list[str],
    *,
    log_file: Path,
    stats: str | os.PathLike,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    kill: Kill | None = None,
    timeout: float | None = None,
    progress: tuple[str, int] | None = None,
    watch_cores: bool = False,
) -> Run:
    """Run ``command`` to its end, or until ``kill`` (a ``Kill``) has ended it; ``TimeoutError`` after
    ``timeout`` seconds.

    ``stats``: the run's ``stats.jsonl`` (a glob pattern is allowed). Stats of earlier legs of the
    same trial (a recovered run) are in the same file: ``Kill.after_step`` counts them too.
    ``progress``: (label, total steps) for a tqdm bar whose label says what the run is doing until its
    first step (starting workers, starting the inference server, warm-up). ``watch_cores``: read
    ``thread_cores`` once two steps are committed. The log file is appended to, each leg headed by its
    command line. A run that timed out, or whose group ``kill`` killed, has its whole process group
    SIGKILLed at the end; what a run that ended by itself left running is left (the tests'
    ``no_orphans`` finds it).
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        log.write(("$ " + " ".join(command) + "\n").encode())
        log.flush()
        phase = _Phase(log_file)
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        watch = _Watch(proc, log_file, phase, stats, kill, progress, watch_cores)
        try:
            if not wait_until(watch.poll, timeout=timeout or None, interval=POLL_SECONDS):
                raise TimeoutError(watch.timeout_report(command, timeout))
        finally:
            if proc.poll() is None or watch.group_killed:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return watch.result()


#: Variables that put AReaL in SPMD mode (one process per rank) or pick a rendezvous port; a run
#: launched here is a single-controller run and chooses its own.
SPMD_ENV = ("AREAL_SPMD_MODE", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def without_spmd_env(environ) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k not in SPMD_ENV}


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
    for proc in process_tree(root_pid):
        try:
            r = role(proc)
            for task in Path(f"/proc/{proc.pid}/task").iterdir():
                text = (task / "status").read_text()
                allowed = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                               if line.startswith("Cpus_allowed_list"))
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
