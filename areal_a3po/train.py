"""``python -m areal_a3po.train --config EXPERIMENT.yaml [hydra overrides]``

AReaL's GSM8K RL entry point (RLVR workflow, math reward) with the plugin: the config is loaded by
``areal_a3po.load_config`` (so ``actor.prox_logp_method: a3po`` and ``actor.a3po`` are understood
and validated before anything starts) and the trainer is ``A3POTrainer``. Launch it the way AReaL
experiments are launched (``scheduler.type=local``, ray or slurm in the YAML); the model and the
dataset are local paths from the config (``actor.path``, ``train_dataset.path``).

``A3PO_SYNTHETIC=<shape>`` (e.g. ``qwen2.5-1.5b``) swaps in the synthetic stand-ins of
``areal_a3po.synthetic``: a random-initialised model of that shape (written once under
``<cluster.fileroot>/synthetic/<shape>``), digit-reversal prompts and their reward, so the timing
comparison runs on any GPU box without weights or datasets.
"""

from __future__ import annotations

import os
import sys

#: AReaL's GSM8K reward (areal.reward.gsm8k); override with A3PO_REWARD_FN=module.function.
DEFAULT_REWARD_FN = "areal.reward.gsm8k.gsm8k_reward_fn"
WORKFLOW = "areal.workflow.rlvr.RLVRWorkflow"


def prepare(argv: list[str], environ=os.environ) -> dict:
    """Everything ``main`` builds before the trainer: the config, the datasets and the workflow
    arguments (with ``A3PO_SYNTHETIC`` set: the synthetic model, prompts and reward)."""
    from areal.dataset import get_custom_dataset
    from areal.utils.hf_utils import load_hf_tokenizer
    from areal.utils.stats_logger import StatsLogger

    from areal_a3po.config import load_config

    config, _ = load_config(argv)
    shape = environ.get("A3PO_SYNTHETIC")
    reward = environ.get("A3PO_REWARD_FN", DEFAULT_REWARD_FN)
    if shape:
        from areal_a3po.synthetic import build_synthetic_model, synthetic_dataset

        model_dir = synthetic_model_dir(config, shape)
        if not os.path.exists(os.path.join(model_dir, "model.safetensors")) and not os.path.exists(
            os.path.join(model_dir, "model.safetensors.index.json")
        ):
            build_synthetic_model(model_dir, shape)
        config, _ = load_config([*argv, f"actor.path={model_dir}"])  # tokenizer/rollout paths follow ${actor.path}
        reward = "areal_a3po.synthetic.reward_fn"
        steps = config.total_train_steps or 1000
        train_dataset = synthetic_dataset(config.train_dataset.batch_size * steps, seed=config.seed)
        valid_dataset = synthetic_dataset(256, seed=config.seed + 1) if config.valid_dataset else None
    else:
        tokenizer = load_hf_tokenizer(config.tokenizer_path)
        train_dataset = get_custom_dataset("train", config.train_dataset, tokenizer)
        valid_dataset = get_custom_dataset("test", config.valid_dataset, tokenizer) if config.valid_dataset else None

    log_dir = StatsLogger.get_log_path(config.stats_logger)
    workflow_kwargs = dict(
        reward_fn=reward,
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
    return dict(config=config, train_dataset=train_dataset, valid_dataset=valid_dataset,
                workflow_kwargs=workflow_kwargs, eval_workflow_kwargs=eval_workflow_kwargs)


def main(argv: list[str]) -> None:
    from areal_a3po.trainer import A3POTrainer

    run = prepare(argv)
    with A3POTrainer(run["config"], train_dataset=run["train_dataset"], valid_dataset=run["valid_dataset"]) as trainer:
        trainer.train(
            workflow=WORKFLOW,
            workflow_kwargs=run["workflow_kwargs"],
            eval_workflow=WORKFLOW,
            eval_workflow_kwargs=run["eval_workflow_kwargs"],
        )


def synthetic_model_dir(config, shape: str) -> str:
    """Where ``A3PO_SYNTHETIC=<shape>`` keeps its random model (shared by the runs of one fileroot)."""
    return os.path.join(config.cluster.fileroot, "synthetic", shape)


if __name__ == "__main__":
    main(sys.argv[1:])
