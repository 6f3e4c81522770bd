"""What each trainer rank saw at every step of a real run: the tests' window on data parallelism.

AReaL reduces every statistic over the data-parallel ranks before it commits it, so the committed
stats cannot say whether the ranks' shards differed. ``RankRecordingFSDPActor`` is the plugin's
``A3POFSDPActor`` that, after each update, appends one JSON line per rank to the file named by
``$A3PO_RANKS_FILE``: the trainer version, this rank's generated tokens by staleness, the fallback's
mode after the step, whether AReaL's recompute forward ran, this rank's audit totals per
staleness bucket (sum of |â − p| and token count), read from this rank's ``stats_tracker`` before
AReaL reduces it, and whether the shard's consecutive ``group_size`` trajectories are each one
prompt's samples (what AReaL's group reward normalisation assumes). ``benchmarks.harness.train`` builds this actor when that variable is set.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist

from areal_a3po.actor import A3POFSDPActor, A3POPPOActor
from areal_a3po.proximal import staleness

#: The environment variable that names the file (and turns the recording on).
RANKS_FILE_ENV = "A3PO_RANKS_FILE"
#: Where the actor's audit keys live in AReaL's stats tracker during an update.
AUDIT_SCOPE = "ppo_actor/update/a3po/audit/"


def _local_audit(prefix: str = AUDIT_SCOPE) -> dict[str, list[float]]:
    """This rank's ``audit/<bucket>/abs_error`` totals so far in the step: bucket → [Σ|â − p|, tokens]."""
    from areal.utils import stats_tracker

    tracker = stats_tracker.DEFAULT_TRACKER
    out = {}
    for key, values in tracker.stats.items():
        if not (key.startswith(prefix + "staleness_") and key.endswith("/abs_error") and key.count("/") == 5):
            continue
        masks = tracker.stats[tracker.denominators[key]]
        total = sum(float(torch.where(m, v, 0.0).sum()) for v, m in zip(values, masks))
        out[key[len(prefix):].split("/")[0]] = [total, float(sum(int(m.sum()) for m in masks))]
    return out


def groups_intact(trajectories: list[dict[str, Any]], group_size: int) -> bool:
    """Whether every run of ``group_size`` consecutive rows of the shard (each trajectory dict holds
    one or more rows: AReaL's loop hands over a prompt's samples as one dict) shares one prompt (its
    tokens before the first generated one): what AReaL 1.0.4's group reward normalisation assumes of
    a shard once its dicts are concatenated."""
    prompts = [tuple(ids[versions < 0].tolist()) for t in trajectories for ids, versions in zip(t["input_ids"], t["versions"])]
    return all(len(set(prompts[i : i + group_size])) == 1 for i in range(0, len(prompts), group_size))


class RankRecordingActor(A3POPPOActor):
    """``A3POPPOActor`` that records this rank's view of each update (see the module docstring)."""

    def compute_advantages(self, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
        norm = self.config.reward_norm
        self._groups_intact = groups_intact(data, norm.group_size) if norm is not None and norm.mean_level == "group" else None
        return super().compute_advantages(data)

    def _ppo_update(self, data: dict[str, Any]) -> None:
        k = self.engine.get_version()
        tokens = data["loss_mask"].bool() & (data["versions"] >= 0)
        d = staleness(data["versions"], k)[tokens]
        super()._ppo_update(data)
        row = dict(
            rank=dist.get_rank() if dist.is_initialized() else 0,
            version=k,
            staleness={str(v): int((d == v).sum()) for v in sorted(set(d.long().tolist()))},
            mode=self.fallback.mode,
            recomputed=data.get("prox_logp") is not None,
            audit=_local_audit(),
            groups_intact=getattr(self, "_groups_intact", None),
        )
        with open(os.environ[RANKS_FILE_ENV], "a") as f:
            f.write(json.dumps(row) + "\n")


class RankRecordingFSDPActor(A3POFSDPActor):
    """``A3POFSDPActor`` whose actor is ``RankRecordingActor``."""

    def __init__(self, config: Any):
        super().__init__(config)
        self.actor = RankRecordingActor(config, self)


def read_ranks(path: str | os.PathLike) -> dict[int, dict[int, dict]]:
    """The recorded rows as {version: {rank: row}}."""
    out: dict[int, dict[int, dict]] = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            out.setdefault(row["version"], {})[row["rank"]] = row
    return out
