"""One decision for all trainer ranks: the same error, the same counts, one log line.

Each data-parallel rank runs the plugin's checks on its own shard of the batch. A check that fails
on one rank must stop every rank with the same error: if only that rank raised, its peers would
wait in the next collective (the micro-batch count all-gather of AReaL's ``train_batch``, FSDP's
all-gathers), which hangs an NCCL run and aborts a gloo one far from the cause. So every check is
local first and then agreed on with one small collective (``raise_together``, ``gather_rows``), and
what is written to the log is written by rank 0 only (``is_rank_zero``).

Without an initialised process group (one process, tests) everything here is local and free.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["broadcast_from_rank_zero", "collective_device_type", "device_of", "distributed", "gather_rows", "is_rank_zero", "raise_together"]

def distributed(group=None) -> bool:
    """Whether ``group`` (default: the world) spans more than this process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def is_rank_zero() -> bool:
    """Rank 0 of the world, or the only process: the rank that writes the plugin's log lines."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def collective_device_type(backend: str) -> str:
    """The device type whose tensors ``backend``'s collectives take: ``cpu`` where the backend takes CPU
    tensors (gloo, mpi, ucc), else the one device type it is registered for (nccl: ``cuda``; xccl: ``xpu``;
    a backend a platform registers, such as Ascend's hccl: ``npu``). NCCL refuses a CPU tensor."""
    types = dist.Backend.backend_capability.get(str(backend).lower())
    if not types:
        raise ValueError(
            f"A-3PO: the process group's backend {backend!r} is not registered with torch.distributed "
            f"(known: {sorted(dist.Backend.backend_capability)}); cannot tell which device its collectives take."
        )
    return "cpu" if "cpu" in types else types[0]


def device_of(group) -> torch.device:
    """Where ``group``'s collectives take tensors: the CPU for gloo, else the current device of the
    backend's device type (CUDA for NCCL, the NPU for HCCL)."""
    kind = collective_device_type(dist.get_backend(group))
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, torch.get_device_module(kind).current_device())


def gather_rows(row: list[int], group=None) -> torch.Tensor:
    """Every rank's ``row`` (same length everywhere) as a [ranks, len] int64 tensor on the CPU: one all-gather."""
    local = torch.tensor(row, dtype=torch.int64)
    if not distributed(group):
        return local.unsqueeze(0)
    local = local.to(device_of(group))
    rows = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, local, group=group)
    return torch.stack(rows).cpu()


def _message(error: BaseException) -> str:
    # KeyError's str() quotes its message; take the message itself.
    if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
        return error.args[0]
    return str(error)


def _describe(error: BaseException) -> tuple[str, str, str]:
    """What another rank needs to raise ``error`` again: its class's module and name, and its message."""
    cls = type(error)
    return cls.__module__, cls.__qualname__, _message(error)


def _rebuild(described: tuple[str, str, str], tag: str) -> BaseException:
    """``described``'s error with ``tag`` appended to its message: of its own type where that type is
    importable here and takes a message alone (``ValueError``, ``FloatingPointError``, torch's
    ``OutOfMemoryError``, the plugin's errors); otherwise a ``RuntimeError`` that names the type
    (``UnicodeDecodeError``, whose constructor takes five arguments; a class only one rank has)."""
    import importlib

    module, name, message = described
    text = f"{message} {tag}"
    try:
        cls = importlib.import_module(module)
        for part in name.split("."):
            cls = getattr(cls, part)
        error = cls(text)
        if isinstance(error, Exception) and type(error) is cls and text in str(error):
            return error
    except Exception:  # noqa: BLE001 - any type that cannot be rebuilt falls back below
        pass
    return RuntimeError(f"{name}: {text}")


def raise_together(error: BaseException | None, group=None, *, failed: bool | None = None) -> None:
    """Raise the same error on every rank of ``group`` when ``error`` is set on any of them.

    ``failed`` says whether any rank failed when the caller already knows it from its own
    collective (``gather_rows``); otherwise one all-reduce of a flag finds out. Only then are the
    messages gathered: the error of the lowest failing rank is raised everywhere, of its type where
    that type can be rebuilt from its message (``_rebuild``), tagged with that rank (``[rank 1 of 2;
    every rank stops]``), chained to the original on that rank.
    """
    if not distributed(group):
        if error is not None:
            raise error
        return
    if failed is None:
        flag = torch.tensor([0 if error is None else 1], device=device_of(group))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        failed = bool(flag.item())
    if not failed:
        return
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, None if error is None else _describe(error), group=group)
    index, described = next((i, e) for i, e in enumerate(everyone) if e is not None)
    rank = dist.get_global_rank(group, index) if group is not None else index
    tagged = _rebuild(described, f"[rank {rank} of {len(everyone)}; every rank stops]")
    if error is not None and dist.get_rank(group) == index:
        raise tagged from error
    raise tagged


def broadcast_from_rank_zero(fn, group=None):
    """Run ``fn()`` on rank 0 only and return its result on every rank; if it raises, every rank
    raises that error (``raise_together``'s types and tag). For file I/O that one rank does for all."""
    if not distributed(group):
        return fn()
    result, error = None, None
    if dist.get_rank(group) == 0:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - sent to every rank below
            error = exc
    box = [(result, None if error is None else _describe(error))]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    result, sent = box[0]
    if sent is not None:
        tagged = _rebuild(sent, f"[rank 0 of {dist.get_world_size(group)}; every rank stops]")
        if error is not None:
            raise tagged from error
        raise tagged
    return result
