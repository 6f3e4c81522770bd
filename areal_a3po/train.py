"""``python -m areal_a3po.train --config EXPERIMENT.yaml [hydra overrides]``

AReaL's GSM8K RL entry point (RLVR workflow, math reward) with the plugin: the config is loaded by
``areal_a3po.load_config`` (so ``actor.prox_logp_method: a3po`` and ``actor.a3po`` are understood
and validated before anything starts) and the trainer is ``A3POTrainer``. Launch it the way AReaL
experiments are launched (``scheduler.type=local``, ray or slurm in the YAML); the model and the
dataset are local paths from the config (``actor.path``, ``train_dataset.path``).
"""

from __future__ import annotations

import os
import sys

#: AReaL's GSM8K reward (areal.reward.gsm8k); override with A3PO_REWARD_FN=module.function.
DEFAULT_REWARD_FN = "areal.reward.gsm8k.gsm8k_reward_fn"
WORKFLOW = "areal.workflow.rlvr.RLVRWorkflow"


def main(argv: list[str]) -> None:
    from areal.dataset import get_custom_dataset
    from areal.utils.hf_utils import load_hf_tokenizer
    from areal.utils.stats_logger import StatsLogger

    from areal_a3po.config import load_config
    from areal_a3po.trainer import A3POTrainer

    config, _ = load_config(argv)
    tokenizer = load_hf_tokenizer(config.tokenizer_path)
    train_dataset = get_custom_dataset("train", config.train_dataset, tokenizer)
    valid_dataset = get_custom_dataset("test", config.valid_dataset, tokenizer) if config.valid_dataset else None

    log_dir = StatsLogger.get_log_path(config.stats_logger)
    workflow_kwargs = dict(
        reward_fn=os.environ.get("A3PO_REWARD_FN", DEFAULT_REWARD_FN),
        gconfig=config.gconfig,
        tokenizer=config.tokenizer_path,
        enable_thinking=False,
        dump_dir=os.path.join(log_dir, "generated"),
    )
    eval_workflow_kwargs = dict(
        workflow_kwargs,
        gconfig=config.gconfig.new(temperature=0.6),
        rollout_stat_scope="eval-rollout",
        dump_dir=os.path.join(log_dir, "generated-eval"),
    )
    with A3POTrainer(config, train_dataset=train_dataset, valid_dataset=valid_dataset) as trainer:
        trainer.train(
            workflow=WORKFLOW,
            workflow_kwargs=workflow_kwargs,
            eval_workflow=WORKFLOW,
            eval_workflow_kwargs=eval_workflow_kwargs,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
