"""Processes a run starts, and stopping them: the one place that finds and stops process trees.

A process is told apart from another that reuses its pid by its start time: ``(pid, create_time)``.
``descendants`` lists the processes below this one; ``stop`` ends a set of them (SIGTERM, a grace
period, then SIGKILL), a process that has exited meanwhile being no error. The entry point stops only
what the run started (``descendants`` after, minus before), never other children of the caller (a
notebook's, a launcher's).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import psutil

__all__ = ["Started", "alive", "descendants", "stop", "stop_tree"]

#: A process as it was started: (pid, create time).
Started = tuple[int, float]


def descendants(pid: int | None = None) -> list[Started]:
    """Every process below ``pid`` (default: this one), as ``(pid, create time)``."""
    out = []
    try:
        children = psutil.Process(pid or os.getpid()).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for child in children:
        try:
            out.append((child.pid, child.create_time()))
        except psutil.Error:
            continue
    return out


def alive(started: Iterable[Started]) -> list[psutil.Process]:
    """The processes of ``started`` still running (the same process: same pid and start time)."""
    out = []
    for pid, created in started:
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def stop(started: Iterable[Started], grace: float = 5.0) -> None:
    """Stop the processes of ``started`` still running: SIGTERM, up to ``grace`` seconds, then SIGKILL."""
    procs = alive(started)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            continue
    _, left = psutil.wait_procs(procs, timeout=grace)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(left, timeout=grace)


def stop_tree(pid: int, grace: float = 5.0) -> None:
    """Stop ``pid`` and every process below it."""
    try:
        root = [(pid, psutil.Process(pid).create_time())]
    except psutil.Error:
        root = []
    stop(descendants(pid) + root, grace)
