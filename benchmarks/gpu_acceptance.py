"""GPU acceptance: what a GPU run meets and a CPU test does not, checked in one command (issue 24).

    python -m benchmarks.gpu_acceptance --json $OUT/gpu_acceptance.json     # one GPU: NCCL, bf16, 1.5B shape
    python -m benchmarks.gpu_acceptance --dry-run --json out.json           # the same code on CPU: gloo, tiny, float32

One process, world size 1, AReaL's SPMD mode (``benchmarks.harness.actor``); nothing downloaded.

1. ``collectives``: a process group of the platform's backend (NCCL on the GPU, gloo on CPU). NCCL
   refuses a CPU tensor in an ``all_reduce``: its error is kept. A guard in front of
   ``torch.distributed``'s collectives refuses any tensor not on the group's device
   (``areal_a3po.ranks.device_of``), so the defect class is named on CPU too: there the CPU is the
   group's device and the only real one, so a meta tensor stands for "another device" (as in the
   project's tests).
2. ``plugin``: AReaL's FSDP actor through the plugin (``A3POFSDPActor``; a small model in float32 on
   the platform's device), ``audit_interval=1``, a fallback threshold. Step 1 plants drift (lr 0.1, two
   minibatches, stale versions): the fallback must switch to recompute. Step 2 is a batch the
   approximation gets right: it must switch back. After each, AReaL's ``export_stats`` reduces every
   key over the data-parallel group with the guard on: each tensor on the group's device. Then the
   audit keys of a minibatch without tokens (``loss.log_empty_audit``): on the engine's device they
   export; on another device (the CPU on the GPU, meta on CPU) they are refused (NCCL's own error
   on the GPU, the guard's on CPU).
3. ``timing``: AReaL's own ``compute_logp`` (the recompute phase, R) and ``compute_advantages`` +
   ``ppo_update`` (T), ``prox_logp_method=recompute`` against ``a3po`` (anchor paper, no audits),
   interleaved step by step on one actor (the method switched per step, order rotated). GPU:
   Qwen2.5-1.5B's shape (random init, ``init_from_scratch``), bf16, gradient checkpointing, SDPA
   (the image has no flash-attn: packed micro-batches attend across their sequences, so attention
   costs more than with flash-attn's varlen kernels, alike for both methods), micro-batches of at
   most 10240 tokens (Setup 1's YAML), and Setup 1's per-GPU batch: 256 prompts x 4 samples over 4
   trainer GPUs = 64 prompts x 4 samples, prompts of 128-256 tokens and responses of 64-1024
   (max_new_tokens 1024), staleness 0-2. Reported: medians and IQR, the recompute share R/(R+T),
   the a3po step against the recompute step, the peak GPU memory.
4. ``gpu_phases``: ``benchmarks.gpu_phases`` (torch and transformers only) on one micro-batch of the
   same token count (5 x 2048), beside AReaL's figures on the same machine.

``--budget`` (seconds, the whole command): the timing's repeats shrink to what is left after the
checks and gpu_phases (at least one pair when anything is left). Exit status 0 only when every check
passed; the JSON is written in any case.
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from typing import Any

#: ``torch.distributed`` functions the guard stands in front of (what AReaL, FSDP and the plugin call).
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
               "broadcast", "reduce", "all_to_all_single")
AUDIT = "ppo_actor/update/a3po/audit/"
#: The check's batch (as the tests' helpers): rows, row length, prompt length, trainer version.
B, T, PROMPT, K = 4, 12, 5, 3
FALLBACK = {"metric": "abs_error", "threshold": 1e-2, "patience": 1, "recover_after": 1}

#: What the GPU run and the dry run use (``--dry-run`` picks the second).
PROFILES = {
    "gpu": dict(backend="nccl", check_shape="tiny", shape="qwen2.5-1.5b", dtype="bfloat16", prompts=64, samples=4,
                prompt_len=(128, 256), response_len=(64, 1024), max_tokens_per_mb=10240, repeats=10,
                phases_seqs=5, phases_seq_len=2048, phases_repeats=10, phases_warmup=3, budget=450.0,
                min_timing_seconds=60),
    "dry-run": dict(backend="gloo", check_shape="tiny", shape="tiny", dtype="float32", prompts=2, samples=4,
                    prompt_len=(8, 16), response_len=(8, 40), max_tokens_per_mb=128, repeats=3,
                    phases_seqs=2, phases_seq_len=64, phases_repeats=3, phases_warmup=1, budget=150.0,
                    min_timing_seconds=5),
}


class CollectiveDeviceError(RuntimeError):
    """A tensor passed to a collective is not on the device of the group's backend."""


# --- the guard ------------------------------------------------------------------------------------

def _tensors(value) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _on(device, expected) -> bool:
    return device.type == expected.type and (expected.index is None or device.index in (None, expected.index))


@contextmanager
def device_guard(counts: dict[str, int] | None = None):
    """Refuse, by name, any tensor given to a ``torch.distributed`` collective that is not on the device
    the group's backend takes (``areal_a3po.ranks.device_of``: the CPU for gloo, CUDA for NCCL).
    ``counts`` gets one entry per call, ``"<backend>:<device type>"``. Calls made inside torch (an
    object collective's own all_gather) go to torch's functions directly and are not seen."""
    import torch.distributed as dist

    from areal_a3po.ranks import device_of

    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def guarded(name, fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            bound = signature.bind_partial(*args, **kwargs)
            group = bound.arguments.get("group")
            expected = device_of(group)
            backend = str(dist.get_backend(group))
            for arg, value in bound.arguments.items():
                for t in _tensors(value):
                    if not _on(t.device, expected):
                        raise CollectiveDeviceError(
                            f"dist.{name}: '{arg}' is on {t.device}, but the group's backend {backend!r} takes "
                            f"tensors on {expected} (put it on ranks.device_of(group) first)"
                        )
            if counts is not None:
                key = f"{backend}:{expected.type}"
                counts[key] = counts.get(key, 0) + 1
            return fn(*args, **kwargs)

        return call

    for name, fn in originals.items():
        setattr(dist, name, guarded(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


# --- 1. collectives -------------------------------------------------------------------------------

def init_world(backend: str) -> None:
    """The world-size-1 process group AReaL's engine then reuses (``create_process_group``)."""
    import torch
    import torch.distributed as dist

    from benchmarks.harness.actor import setup_single_process_env

    setup_single_process_env()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)


def check_collectives(device) -> dict:
    """The backend's own treatment of a CPU tensor, an all_reduce on the group's device, the guard's refusal."""
    import torch
    import torch.distributed as dist

    from areal_a3po.ranks import device_of

    backend = str(dist.get_backend())
    out: dict[str, Any] = dict(backend=backend, group_device=str(device_of(None)))
    try:  # NCCL: refused (the defect class); gloo: the CPU is its device
        cpu = torch.ones(1)
        dist.all_reduce(cpu)
        out["cpu_tensor"] = f"accepted (sum {cpu.item():g})"
        out["native_refusal"] = None
    except Exception as exc:  # noqa: BLE001 - the error is the result
        out["native_refusal"] = _error(exc)
    on_device = torch.ones(1, device=device_of(None))
    dist.all_reduce(on_device)  # the group still works after a refusal
    out["on_device_all_reduce"] = on_device.item()
    other = torch.ones(1, device="meta" if device.type == "cpu" else "cpu")
    try:
        with device_guard():
            dist.all_reduce(other)
        out["guard_refusal"] = None
    except CollectiveDeviceError as exc:
        out["guard_refusal"] = _error(exc)
    out["ok"] = bool(
        out["guard_refusal"] and out["on_device_all_reduce"] == 1.0
        and (out["native_refusal"] is not None if backend == "nccl" else out["native_refusal"] is None)
    )
    return out


# --- 2. the plugin's audit, fallback and stats export ---------------------------------------------

def on_engine(actor, trajs: list[dict]) -> list[dict]:
    """The trajectories on the engine's device, as AReaL's trainer hands them over (``dist_rollout``
    moves each batch to the current device): AReaL's own update stats are then recorded there."""
    from areal.utils.data import tensor_container_to

    return tensor_container_to(trajs, actor.device)


def _behaviour(actor, ids, loss_mask, noise: float, seed: int):
    """log π_behave as an inference engine reports it: the actor's own token logprobs (+ noise), on the CPU."""
    import torch

    trajs = [dict(input_ids=x[None].to(torch.int32), attention_mask=torch.ones(1, x.numel(), dtype=torch.bool)) for x in ids]
    aligned = torch.cat([lp.detach().float().cpu() for lp in actor.compute_logp(on_engine(actor, trajs))], dim=0)
    out = torch.zeros_like(aligned)
    out[:, 1:] = aligned[:, :-1]
    g = torch.Generator().manual_seed(seed + 1)
    return (out + noise * torch.randn(ids.shape, generator=g)) * loss_mask


def _check_rollout(actor, versions, *, noise: float, seed: int):
    import torch

    from benchmarks.harness.streams import Rollout

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (B, T), generator=g)
    loss_mask = torch.zeros(B, T, dtype=torch.int32)
    loss_mask[:, PROMPT:] = 1
    rewards = torch.tensor([1.0, -1.0, 0.5, -0.5])
    return Rollout(ids, loss_mask, versions, _behaviour(actor, ids, loss_mask, noise, seed), rewards)


def _stale_versions():
    """Versions at K = 3 (prompt -1): staleness 0, 2 then 1 (a switch mid-response), 1, 3."""
    import torch

    v = torch.full((B, T), -1)
    v[0, PROMPT:] = 3
    v[1, PROMPT:8], v[1, 8:] = 1, 2
    v[2, PROMPT:] = 2
    v[3, PROMPT:] = 0
    return v


def _tracker_devices() -> list[str]:
    from areal.utils import stats_tracker

    return sorted({t.device.type for values in stats_tracker.DEFAULT_TRACKER.stats.values() for t in values
                   if hasattr(t, "device")})


def _reset_tracker() -> None:
    from collections import defaultdict

    from areal.utils import stats_tracker

    tracker = stats_tracker.DEFAULT_TRACKER
    tracker.stats, tracker.denominators, tracker.reduce_types = defaultdict(list), {}, {}


def _plugin_step(actor, rollout, version: int) -> dict:
    """One a3po step as the trainer runs it, then AReaL's export over the data-parallel group, guarded."""
    import math

    from areal_a3po.actor import A3POWarning

    before = actor.actor.fallback.mode
    counts: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught, device_guard(counts):
        warnings.simplefilter("always", A3POWarning)
        actor.set_version(version)
        actor.ppo_update(actor.compute_advantages(on_engine(actor, rollout.trajectories())))
        devices = _tracker_devices()
        stats = actor.export_stats()
    value = stats.get(f"{AUDIT}fallback_{FALLBACK['metric']}")
    audit = {k[len(AUDIT):]: v for k, v in stats.items() if k.startswith(AUDIT)}
    return dict(
        version=version, mode_before=before, mode_after=actor.actor.fallback.mode,
        fallback_value=value, recompute_mode=stats.get("ppo_actor/update/a3po/recompute_mode"),
        warnings=[str(w.message) for w in caught if issubclass(w.category, A3POWarning)],
        exported_keys=len(stats), audit_keys=len(audit),
        audit_finite=all(math.isfinite(v) for v in audit.values()),
        tracker_devices=devices, collectives=counts,
    )


def check_plugin(workdir: str, device, shape: str) -> dict:
    """Audit, fallback and stats export through AReaL's FSDP actor with the plugin (see the module doc)."""
    import torch

    from areal_a3po.loss import log_empty_audit
    from benchmarks.harness.actor import make_actor
    from benchmarks.harness.models import build_model

    model = build_model(os.path.join(workdir, "check-model"), shape, seed=0)
    actor = make_actor(model, prox_logp_method="a3po", anchor="recompute", ppo_n_minibatches=2, lr=1e-1,
                       max_tokens_per_mb=T, a3po_options={"audit_interval": 1, "fallback": dict(FALLBACK)})
    out: dict[str, Any] = dict(shape=shape, engine_device=str(actor.device), fallback=dict(FALLBACK))
    try:
        drift = _plugin_step(actor, _check_rollout(actor, _stale_versions(), noise=0.3, seed=0), K)
        current = torch.full((B, T), -1)
        current[:, PROMPT:] = K + 1
        clean = _plugin_step(actor, _check_rollout(actor, current, noise=0.0, seed=7), K + 1)
        out["steps"] = [drift, clean]
        out["fallback_switched"] = (drift["mode_before"], drift["mode_after"]) == ("approximate", "recompute") \
            and drift["fallback_value"] is not None and drift["fallback_value"] > FALLBACK["threshold"] \
            and drift["recompute_mode"] == 0.0
        out["recovered"] = (clean["mode_before"], clean["mode_after"]) == ("recompute", "approximate") \
            and clean["recompute_mode"] == 1.0 and clean["fallback_value"] is not None \
            and clean["fallback_value"] <= FALLBACK["threshold"]
        engine = actor.device.type
        out["export_on_group_device"] = all(
            s["tracker_devices"] == [engine] and s["collectives"] and s["audit_keys"] > 20 and s["audit_finite"]
            for s in (drift, clean)
        )

        # The audit keys of a minibatch this rank never trained on: on the engine's device, then elsewhere.
        a3po = actor.config.a3po
        _reset_tracker()
        with device_guard():
            log_empty_audit(a3po, 0, actor.device)
            empty = actor.export_stats()
        other = torch.device("meta" if engine == "cpu" else "cpu")
        _reset_tracker()
        log_empty_audit(a3po, 0, other)
        try:
            if engine == "cpu":  # gloo takes the CPU: the guard names the other device
                with device_guard():
                    actor.export_stats()
            else:  # the backend itself (NCCL) refuses a CPU tensor
                actor.export_stats()
            refused = None
        except Exception as exc:  # noqa: BLE001 - the error is the result
            refused = _error(exc)
        finally:
            _reset_tracker()
        out["empty_minibatch"] = dict(
            on_engine_device=dict(keys=len(empty), tokens=empty.get("a3po/audit/tokens")),
            on_other_device=str(other), refused=refused,
        )
        out["empty_minibatch_ok"] = len(empty) > 0 and refused is not None
        out["ok"] = bool(out["fallback_switched"] and out["recovered"] and out["export_on_group_device"]
                         and out["empty_minibatch_ok"])
    finally:
        actor.destroy()
    return out


# --- 3. AReaL's compute_logp and ppo_update, recompute against a3po -------------------------------

def setup1_rollout(actor, p: dict, vocab: int, seed: int = 0):
    """Setup 1's per-GPU batch (``p``'s prompts x samples, lengths drawn uniformly), behaviour
    logprobs = the actor's own + noise; ``versions`` holds the staleness (0-2 per sequence, -1 on the
    prompt) until ``_batch_at`` makes versions of it."""
    import torch

    from benchmarks.harness.streams import Rollout

    g = torch.Generator().manual_seed(seed)
    n = p["prompts"] * p["samples"]
    prompt = torch.randint(p["prompt_len"][0], p["prompt_len"][1] + 1, (p["prompts"],), generator=g)
    prompt = prompt.repeat_interleave(p["samples"])  # the samples of a prompt share it
    response = torch.randint(p["response_len"][0], p["response_len"][1] + 1, (n,), generator=g)
    lengths = (prompt + response).tolist()
    L = max(lengths)
    ids = torch.randint(3, vocab, (n, L), generator=g)
    loss_mask = torch.zeros(n, L, dtype=torch.int32)
    stale = torch.full((n, L), -1, dtype=torch.int64)
    d = torch.randint(0, 3, (n,), generator=g)
    for i in range(n):
        loss_mask[i, prompt[i] : lengths[i]] = 1
        stale[i, prompt[i] : lengths[i]] = d[i]
    score = Rollout(ids, loss_mask, stale, torch.zeros(n, L), torch.zeros(n), lengths)
    aligned = [lp.detach().float().cpu() for lp in actor.compute_logp(on_engine(actor, score.trajectories()))]
    behave = torch.zeros(n, L)
    for i, lp in enumerate(aligned):
        behave[i, 1 : lengths[i]] = lp[0, : lengths[i] - 1]
    behave = (behave + 0.05 * torch.randn(n, L, generator=g)) * loss_mask
    rewards = (torch.rand(n, generator=g) > 0.5).float()
    return Rollout(ids, loss_mask, stale, behave, rewards, lengths, group_size=p["samples"])


def _batch_at(actor, rollout, version: int):
    """The rollout's trajectories at trainer version ``version`` (its ``versions`` hold each token's
    staleness, -1 on the prompt), as fresh tensors on the engine's device: a step may change them."""
    import torch

    out = []
    for traj in rollout.trajectories():
        traj = {k: v.clone() for k, v in traj.items()}
        d = traj["versions"]
        traj["versions"] = torch.where(d < 0, d, version - d).to(d.dtype)
        out.append(traj)
    return on_engine(actor, out)


def _quartiles(xs: list[float]) -> dict[str, float]:
    if len(xs) == 1:
        return dict(median=xs[0], p25=xs[0], p75=xs[0], n=1)
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return dict(median=statistics.median(xs), p25=q[0], p75=q[2], n=len(xs))


def time_areal(workdir: str, p: dict, deadline: float, max_repeats: int, log=print) -> dict:
    """Interleaved recompute / a3po steps through AReaL's engine until ``max_repeats`` pairs or the deadline."""
    import torch

    from benchmarks.harness.actor import make_actor, train_step
    from benchmarks.harness.models import build_model, model_shape
    from benchmarks.harness.variants import get

    if deadline - time.perf_counter() < p["min_timing_seconds"]:
        raise RuntimeError(f"the budget is spent: less than {p['min_timing_seconds']} s left for the timing")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model = build_model(os.path.join(workdir, "timing-model"), p["shape"], weights=False)
    actor = make_actor(model, prox_logp_method="a3po", anchor="paper", ppo_n_minibatches=1, lr=1.7e-5,
                       max_tokens_per_mb=p["max_tokens_per_mb"], dtype=p["dtype"], init_from_scratch=True,
                       gradient_checkpointing=True, disable_dropout=True, eps_clip=0.4,
                       a3po_options={"audit_interval": 0})
    try:
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        rollout = setup1_rollout(actor, p, model_shape(p["shape"])["vocab_size"])
        score_s = time.perf_counter() - t
        lanes = [get("recompute"), get("a3po-paper")]
        rows: dict[str, list[dict[str, float]]] = {v.name: [] for v in lanes}
        pairs: list[float] = []
        version = 10
        while True:
            pair_start = time.perf_counter()
            order = lanes if version % 2 == 0 else lanes[::-1]  # no lane always first
            for variant in order:
                variant.apply(actor.config)
                timings: dict[str, float] = {}
                train_step(actor, _batch_at(actor, rollout, version), version=version, timings=timings)
                actor.export_stats()  # as the trainer does every step (not timed)
                rows[variant.name].append(timings)
            version += 1
            pairs.append(time.perf_counter() - pair_start)
            measured = len(pairs) - 1  # the first pair is the warm-up
            estimate = statistics.median(pairs[1:]) if measured else pairs[0]
            log(f"  pair {len(pairs)}: {pairs[-1]:.1f} s")
            if measured >= max_repeats or time.perf_counter() + estimate > deadline:
                break
        rec, a3po = (rows[v.name][1:] or rows[v.name] for v in lanes)
        R = [r["recompute_logp"] for r in rec]
        T_rec = [r["compute_advantage"] + r["train_step"] for r in rec]
        T_a3po = [r["compute_advantage"] + r["train_step"] for r in a3po]
        return dict(
            shape=p["shape"], dtype=p["dtype"], max_tokens_per_mb=p["max_tokens_per_mb"], gradient_checkpointing=True,
            attn_impl="sdpa", seqs=len(rollout.input_ids), tokens=int(sum(rollout.lengths)),
            generated_tokens=int(rollout.loss_mask.sum()), max_seq_len=max(rollout.lengths),
            repeats=len(R), warmup_pairs=1 if len(pairs) > 1 else 0, build_seconds=build_s, scoring_seconds=score_s,
            recompute_logp=_quartiles(R), update_recompute=_quartiles(T_rec), update_a3po=_quartiles(T_a3po),
            step_recompute=_quartiles([r + u for r, u in zip(R, T_rec)]),
            recompute_share=_quartiles([r / (r + u) for r, u in zip(R, T_rec)]),
            a3po_over_recompute_step=_quartiles([a / (r + u) for a, r, u in zip(T_a3po, R, T_rec)]),
            phases={name: [dict(r) for r in rs] for name, rs in rows.items()},
            peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        )
    finally:
        actor.destroy()


# --- the command ----------------------------------------------------------------------------------

def _part(result: dict, name: str, fn, log=print):
    """Run one part; a failure is recorded with its traceback and the command goes on."""
    t = time.perf_counter()
    log(f"[{name}] ...")
    try:
        result[name] = fn()
    except Exception as exc:  # noqa: BLE001 - recorded, and the exit status says it
        result[name] = dict(ok=False, error=_error(exc), traceback=traceback.format_exc())
    result[name]["seconds"] = time.perf_counter() - t
    log(f"[{name}] {'failed: ' + result[name]['error'] if 'error' in result[name] else 'done'} "
        f"({result[name]['seconds']:.1f} s)")
    return result[name]


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "areal"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def format_table(res: dict) -> str:
    def ms(q):
        return f"{q['median'] * 1e3:9.1f} [{q['p25'] * 1e3:.1f}, {q['p75'] * 1e3:.1f}]"

    lines = [f"{res['mode']}: {res['device']}, {res['backend']}; " + ", ".join(f"{k} {v}" for k, v in res["versions"].items())]
    for name in ("collectives", "plugin"):
        c = res["checks"].get(name, {})
        lines.append(f"  {name:<12}{'PASS' if c.get('ok') else 'FAIL'}  " + (c.get("error") or ""))
    col = res["checks"].get("collectives", {})
    if "native_refusal" in col:
        lines.append(f"    {col['backend']} with a CPU tensor: {col['native_refusal'] or col.get('cpu_tensor')}")
        lines.append(f"    guard: {col['guard_refusal']}")
    plug = res["checks"].get("plugin", {})
    for s in plug.get("steps", []):
        lines.append(f"    step {s['version']}: {s['mode_before']} -> {s['mode_after']}, fallback {FALLBACK['metric']} "
                     f"{s['fallback_value']}, {s['exported_keys']} keys exported, collectives {s['collectives']}")
    if "empty_minibatch" in plug:
        lines.append(f"    empty minibatch's audit keys on {plug['empty_minibatch']['on_other_device']}: "
                     f"{plug['empty_minibatch']['refused']}")
    t = res.get("timing", {})
    if "recompute_logp" in t:
        lines.append(f"  AReaL, {t['shape']} {t['dtype']}, {t['seqs']} seqs / {t['tokens']} tokens, mb <= "
                     f"{t['max_tokens_per_mb']}, {t['repeats']} pairs: median [IQR] ms")
        lines.append(f"    recompute_logp (R)        {ms(t['recompute_logp'])}")
        lines.append(f"    update, recompute (T)     {ms(t['update_recompute'])}")
        lines.append(f"    update, a3po              {ms(t['update_a3po'])}")
        lines.append(f"    recompute share R/(R+T)   {t['recompute_share']['median']:.1%}; a3po step / recompute "
                     f"step {t['a3po_over_recompute_step']['median']:.3f}; peak {t['peak_memory_gib']} GiB")
    elif "error" in t:
        lines.append(f"  timing failed: {t['error']}")
    g = res.get("gpu_phases", {})
    if "median_seconds" in g:
        m = g["median_seconds"]
        lines.append(f"  gpu_phases, {g['seqs']} x {g['seq_len']} tokens, {g['repeats']} repeats: recompute "
                     f"{m['recompute'] * 1e3:.1f} ms, train {m['train'] * 1e3:.1f} ms, share {g['recompute_share']:.1%}")
    elif "error" in g:
        lines.append(f"  gpu_phases failed: {g['error']}")
    lines.append(f"  {'ACCEPTED' if res['ok'] else 'NOT ACCEPTED'} in {res['elapsed_seconds']:.0f} s of {res['budget_seconds']:.0f}")
    return "\n".join(lines)


def run(dry_run: bool, budget: float | None = None, repeats: int | None = None, log=print) -> dict:
    start = time.perf_counter()
    mode = "dry-run" if dry_run else "gpu"
    p = dict(PROFILES[mode])
    budget = p["budget"] if budget is None else budget
    deadline = start + budget - (5 if dry_run else 20)  # the rest: writing, freeing, destroying the group
    import torch
    import torch.distributed as dist

    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu_acceptance: no CUDA device is visible here; run it on a GPU machine, "
                         "or with --dry-run (gloo, CPU).")
    device = torch.device("cpu" if dry_run else "cuda")
    res: dict[str, Any] = dict(mode=mode, versions=_versions(), backend=p["backend"], budget_seconds=budget,
                               device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                               profile=p, checks={})
    try:
        with tempfile.TemporaryDirectory(prefix="a3po-gpu-acceptance-") as workdir:
            init_world(p["backend"])
            _part(res["checks"], "collectives", lambda: check_collectives(device), log)
            _part(res["checks"], "plugin", lambda: check_plugin(workdir, device, p["check_shape"]), log)

            def phases():
                from benchmarks import gpu_phases

                return gpu_phases.run(p["phases_seqs"], p["phases_seq_len"], p["phases_repeats"], warmup=p["phases_warmup"],
                                      device=device.type, shape=p["shape"])

            _part(res, "gpu_phases", phases, log)
            gc.collect()  # its model, also after an out-of-memory error
            if device.type == "cuda":
                torch.cuda.empty_cache()
            res["seconds_left_for_timing"] = deadline - time.perf_counter()
            log(f"{res['seconds_left_for_timing']:.0f} s of the budget left for the timing")
            _part(res, "timing", lambda: time_areal(workdir, p, deadline, repeats or p["repeats"], log), log)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    res["ok"] = all(c.get("ok") for c in res["checks"].values()) and all(
        "error" not in res.get(part, {"error": "not run"}) for part in ("gpu_phases", "timing"))
    res["elapsed_seconds"] = time.perf_counter() - start
    return res


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="on CPU: gloo, the tiny shape, float32, a few steps (the GPU's code paths except CUDA)")
    parser.add_argument("--budget", type=float, help="seconds for the whole command (default: 450 on the GPU, 150 dry)")
    parser.add_argument("--repeats", type=int, help="at most this many timed step pairs after the warm-up one")
    parser.add_argument("--json", help="write every figure and check here")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU even on a GPU box: AReaL's platform follows it
    res = run(args.dry_run, args.budget, args.repeats, log=lambda s: print(s, flush=True))
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"wrote {args.json}")
    if not res["ok"]:
        sys.exit(1)
    return res


if __name__ == "__main__":
    main()
