"""AReaL's FSDP PPO actor on CPU, in one process: how the in-process harness builds and steps it.

The actor runs in AReaL's SPMD mode with world size 1, float32, SDPA attention, a constant
learning rate without warm-up and one sequence per micro-batch (packed micro-batches leak attention
across sequences on CPU). ``train_step`` is one step of AReaL's trainer loop without the rollout.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from typing import Any

import torch

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_single_process_env() -> None:
    """Environment for AReaL's SPMD mode with one CPU rank (idempotent)."""
    os.environ.setdefault("AREAL_SPMD_MODE", "1")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def make_actor(
    model_path: str,
    *,
    prox_logp_method: str = "recompute",
    anchor: str = "paper",
    interpolation: str = "loglinear",
    ppo_n_minibatches: int = 1,
    lr: float = 1e-3,
    max_tokens_per_mb: int = 64,
    plugin: bool = True,
    total_steps: int = 1000,
    a3po_options: dict[str, Any] | None = None,
    data_parallel_size: int = 1,
    **overrides: Any,
):
    """An initialised FSDP PPO actor on CPU: the plugin's ``A3POFSDPActor`` or, with
    ``plugin=False``, AReaL's own ``FSDPPPOActor`` (then ``prox_logp_method`` must be AReaL's).

    ``max_tokens_per_mb`` should be at most one sequence's length, so that each micro-batch holds
    one sequence. Decoupled loss, rejection sampling as in AReaL's examples (ratio ≤ 5), no KL.
    ``a3po_options`` go to ``A3POConfig`` next to ``anchor`` and ``interpolation`` (e.g.
    ``{"audit_interval": 1, "fallback": {"threshold": 0.01}}``). ``data_parallel_size`` > 1: one rank of
    that many, in a process whose SPMD variables (WORLD_SIZE, RANK, MASTER_PORT, …) say so.
    """
    setup_single_process_env()
    from areal.api import FinetuneSpec
    from areal.api.alloc_mode import ParallelStrategy
    from areal.api.cli_args import MicroBatchSpec, OptimizerConfig, PPOActorConfig, RejectionSamplingConfig

    kwargs: dict[str, Any] = dict(
        experiment_name="a3po-toy",
        trial_name="t0",
        path=str(model_path),
        attn_impl="sdpa",
        dtype="float32",
        optimizer=OptimizerConfig(lr=lr, lr_scheduler_type="constant", warmup_steps_proportion=0.0, gradient_clipping=1.0),
        mb_spec=MicroBatchSpec(max_tokens_per_mb=max_tokens_per_mb),
        use_decoupled_loss=True,
        prox_logp_method=prox_logp_method,
        ppo_n_minibatches=ppo_n_minibatches,
        kl_ctl=0.0,
        eps_clip=0.2,
        rejection_sampling=RejectionSamplingConfig(level="token", action="mask", metric="ratio", upper=5.0),
    )
    kwargs.update(overrides)
    if plugin:
        from areal_a3po.actor import A3POFSDPActor
        from areal_a3po.config import A3POActorConfig, A3POConfig, FallbackConfig

        options = dict(a3po_options or {})
        if isinstance(options.get("fallback"), dict):
            options["fallback"] = FallbackConfig(**options["fallback"])
        a3po = A3POConfig(anchor=anchor, interpolation=interpolation, **options)
        actor = A3POFSDPActor(config=A3POActorConfig(**kwargs, a3po=a3po))
    else:
        from areal.engine import FSDPPPOActor

        actor = FSDPPPOActor(config=PPOActorConfig(**kwargs))
    actor.create_process_group(parallel_strategy=ParallelStrategy(data_parallel_size=data_parallel_size))
    actor.initialize(addr=None, ft_spec=FinetuneSpec(total_train_epochs=1, dataset_size=total_steps, train_batch_size=1))
    return actor


def parameters(actor) -> torch.Tensor:
    """All of the actor's weights as one flat float64 vector (full tensors of FSDP's DTensors)."""
    out = []
    for p in actor.model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(full.detach().reshape(-1).to(torch.float64).cpu())
    return torch.cat(out)


def load_parameters(actor, flat: torch.Tensor) -> None:
    """Write a vector from ``parameters`` back into the actor's weights (world size 1)."""
    copy_flat(actor.model, flat)


def copy_flat(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Copy ``flat`` into ``model``'s parameters in order (local shards of FSDP's DTensors)."""
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            n = local.numel()
            local.copy_(flat[offset : offset + n].view_as(local).to(local.dtype))
            offset += n
    if offset != flat.numel():
        raise ValueError(f"weight vector has {flat.numel()} values, the model {offset}.")


def _sync() -> None:
    # GPU kernels run asynchronously: a phase has ended only when the device is idle.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def timed(timings: dict[str, float] | None, key: str):
    """Add the seconds the block takes (device synchronised) to ``timings[key]``."""
    _sync()
    start = time.perf_counter()
    yield
    _sync()
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def attach_recomputed_prox(actor, trajs: list[dict[str, Any]]) -> None:
    """AReaL's recompute forward: store π_prox (label-aligned) in each trajectory as ``prox_logp``."""
    for traj, logp in zip(trajs, actor.compute_logp(trajs)):
        traj["prox_logp"] = logp


def train_step(actor, trajs: list[dict[str, Any]], *, version: int, timings: dict[str, float] | None = None) -> None:
    """One trainer step as ``PPOTrainer.train`` runs it (areal 1.0.4, rl_trainer.py ~680-730):
    recompute π_prox only if ``config.actor.should_compute_prox_logp()``, then advantages, update."""
    actor.set_version(version)
    if actor.config.should_compute_prox_logp():
        with timed(timings, "recompute_logp"):
            attach_recomputed_prox(actor, trajs)
    with timed(timings, "compute_advantage"):
        adv = actor.compute_advantages(trajs)
    with timed(timings, "train_step"):
        actor.ppo_update(adv)
        actor.step_lr_scheduler()
