"""``python -m benchmarks.harness.train --config EXPERIMENT.yaml [hydra overrides]``

The plugin's entry point, ``areal_a3po.train`` (its config loading and preflight, AReaL's trainer
loop, the same cleanup and exit statuses), with two things a benchmark needs and a user's run does
not:

- ``synthetic.model: <shape>`` (``configs/cpu_tiny.yaml``, or the override
  ``++synthetic.model=qwen2.5-1.5b``): a random model of that shape (``benchmarks/harness/shapes``,
  written once under ``<cluster.fileroot>/synthetic/<shape>``; ``actor.path`` and every path that
  follows it point there), digit-reversal prompts and their reward (``benchmarks.harness.tasks``),
  so a run needs nothing downloaded. ``synthetic.model: ""`` keeps the config's model and datasets.
- every step's committed stats also appended to ``<AReaL's log dir>/stats.jsonl`` (``STATS_FILE``),
  one JSON object per step with ``global_step`` and ``wall_time``: what ``benchmarks.e2e_speedup``,
  ``benchmarks.mismatch`` and the pipeline tests read; with ``$A3PO_RANKS_FILE`` set, each trainer
  rank's view of every step too (``benchmarks.harness.ranks``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

from areal_a3po import train
from areal_a3po.config import A3POConfigError, A3POGRPOConfig, load_config
from areal_a3po.preflight import PreflightError
from areal_a3po.trainer import A3POTrainer
from benchmarks.harness.models import SHAPES

#: Per-step stats as AReaL commits them, one JSON object per line (plus ``global_step`` and ``wall_time``).
STATS_FILE = "stats.jsonl"
#: The reward of synthetic runs, as AReaL's workers import it.
SYNTHETIC_REWARD_FN = "benchmarks.harness.tasks.reward_fn"


@dataclass
class SyntheticConfig:
    """``synthetic``: run an experiment with nothing downloaded (smoke tests, timing, CPU runs)."""

    model: str = field(
        default="",
        metadata={
            "help": "Model shape to build with random weights and a word-level tokenizer under "
            "<cluster.fileroot>/synthetic/<shape> (actor.path and everything that follows it point there), "
            "trained on digit-reversal prompts with a verifiable reward. '' (default) = off: actor.path and "
            "the datasets come from the config.",
            "choices": ["", *SHAPES],
        },
    )

    @property
    def enabled(self) -> bool:
        return bool(self.model)

    def problems(self, prefix: str = "synthetic") -> list[str]:
        if self.model and self.model not in SHAPES:
            return [f"{prefix}.model={self.model!r} is not a shipped shape; set one of {list(SHAPES)} or ''."]
        return []


@dataclass
class SyntheticGRPOConfig(A3POGRPOConfig):
    """The plugin's experiment config plus the ``synthetic`` block."""

    synthetic: SyntheticConfig = field(
        default_factory=SyntheticConfig,
        metadata={"help": "Random model of a shipped shape and synthetic prompts instead of actor.path and the datasets."},
    )

    def __post_init__(self):
        problems = self.synthetic.problems()
        if problems:
            raise A3POConfigError(problems)
        super().__post_init__()


class StatsFileTrainer(A3POTrainer):
    """``A3POTrainer`` whose committed stats also go to ``<log dir>/stats.jsonl``; with
    ``$A3PO_RANKS_FILE`` set, its FSDP actor records each rank's view of every step there
    (``benchmarks.harness.ranks``)."""

    def actor_engine_class(self, backend: str) -> type:
        from benchmarks.harness.ranks import RANKS_FILE_ENV, RankRecordingFSDPActor

        if backend == "fsdp" and os.environ.get(RANKS_FILE_ENV):
            return RankRecordingFSDPActor
        return super().actor_engine_class(backend)

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        from areal.utils.stats_logger import StatsLogger

        self.stats_logger = JsonlStatsLogger(self.stats_logger, os.path.join(StatsLogger.get_log_path(config.stats_logger), STATS_FILE))


class JsonlStatsLogger:
    """AReaL's ``StatsLogger`` with each ``commit`` also appended to a JSON-lines file (rank 0 only,
    like AReaL's own commit); everything else calls through."""

    def __init__(self, inner, path: str):
        self._inner = inner
        self.path = path

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def commit(self, epoch: int, step: int, global_step: int, data):
        self._inner.commit(epoch, step, global_step, data)
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() != 0:
            return
        rows = data if isinstance(data, list) else [data]
        with open(self.path, "a") as f:
            for row in rows:
                clean = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not k.endswith("__count")}
                f.write(json.dumps({"global_step": global_step, "wall_time": time.time(), **clean}) + "\n")


def synthetic_model_dir(config, shape: str) -> str:
    """Where ``synthetic.model=<shape>`` keeps its random model (shared by the runs of one fileroot)."""
    return os.path.join(config.cluster.fileroot, "synthetic", shape)


def inputs(argv: list[str]) -> train.Inputs:
    """``areal_a3po.train``'s inputs, or with ``synthetic.model`` set: the random model (built once),
    digit-reversal prompts (``batch_size × total_train_steps`` of them) and their reward."""
    config = train.load(argv, SyntheticGRPOConfig)
    if not config.synthetic.enabled:
        return train.inputs(config)
    from benchmarks.harness.models import build_model
    from benchmarks.harness.tasks import reversal_dataset

    model_dir = synthetic_model_dir(config, config.synthetic.model)
    if not any(os.path.exists(os.path.join(model_dir, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
        build_model(model_dir, config.synthetic.model)
    config = train.load([*argv, f"actor.path={model_dir}"], SyntheticGRPOConfig)  # tokenizer/server paths follow ${actor.path}
    steps = config.total_train_steps or 1000
    train_dataset = reversal_dataset(config.train_dataset.batch_size * steps, seed=config.seed)
    valid_dataset = reversal_dataset(256, seed=config.seed + 1) if config.valid_dataset else None
    kwargs, eval_kwargs = train.workflow_kwargs(config, SYNTHETIC_REWARD_FN)
    return train.Inputs(config, train_dataset, valid_dataset, kwargs, eval_kwargs)


PROG = "benchmarks.harness.train"
#: The repository's root: AReaL's workers (local or Ray) import the synthetic reward from it.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str]) -> int:
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if REPO not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([REPO, *paths])  # inherited by every worker the run starts
    try:
        job = inputs(argv)
    except (A3POConfigError, PreflightError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    return train.run(job, StatsFileTrainer, prog=PROG)


if __name__ == "__main__":
    # Run the module's importable copy: AReaL ships the config to its workers by class path, and
    # ``__main__.SyntheticGRPOConfig`` is not one they can import (they would get a plain dict).
    from benchmarks.harness.train import main as _main

    train.exit_now(_main(sys.argv[1:]))
