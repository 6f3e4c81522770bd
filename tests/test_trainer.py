"""A3POTrainer builds the plugin's actor, in SPMD mode and for AReaL's single-controller workers."""

import importlib

import pytest

from areal_a3po import A3POActorConfig, A3POFSDPActor, A3POTrainer, actor_engine_class


def test_backend_lookup():
    assert actor_engine_class("fsdp") is A3POFSDPActor
    assert actor_engine_class("archon").__name__ == "A3POArchonActor"
    with pytest.raises(ValueError, match=r"actor\.backend 'jax': areal-a3po supports \['archon', 'fsdp', 'megatron'\]"):
        actor_engine_class("jax")


def test_single_controller_workers_import_the_plugin_class():
    # The controller ships f"{cls.__module__}.{cls.__name__}" to the workers, which import it.
    from areal.trainer.ppo.actor import PPOActorController

    config = A3POActorConfig(experiment_name="e", trial_name="t", backend="fsdp:d1", use_decoupled_loss=True, prox_logp_method="a3po")
    controller = A3POFSDPActor.as_controller(config, scheduler=None)
    assert isinstance(controller, PPOActorController)
    cls = controller.train_engine
    module, _, name = f"{cls.__module__}.{cls.__name__}".rpartition(".")
    assert getattr(importlib.import_module(module), name) is A3POFSDPActor


@pytest.mark.integration
def test_spmd_trainer_creates_the_plugin_actor(tiny_model, monkeypatch):
    from areal.api.alloc_mode import ModelAllocation
    from areal.api.cli_args import PPOActorConfig

    from areal_a3po.actor import A3POPPOActor
    from areal_a3po.toy import setup_single_process_env

    setup_single_process_env()
    trainer = object.__new__(A3POTrainer)  # only _create_train_engine is exercised (no rollout servers on CPU)
    trainer.scheduler = None
    alloc = ModelAllocation.from_str("fsdp:d1", name="actor")
    kw = dict(experiment_name="e", trial_name="t", path=tiny_model, attn_impl="sdpa", dtype="float32", backend="fsdp:d1")
    actor = trainer._create_train_engine(A3POActorConfig(**kw, use_decoupled_loss=True, prox_logp_method="a3po"), alloc)
    assert type(actor) is A3POFSDPActor and type(actor.actor) is A3POPPOActor
    ref = trainer._create_train_engine(PPOActorConfig(**kw), alloc)  # the reference model stays AReaL's
    assert type(ref).__name__ == "FSDPPPOActor"


def test_plain_config_with_a3po_is_refused():
    from areal.api.cli_args import GRPOConfig

    config = GRPOConfig(experiment_name="e", trial_name="t")
    config.actor.prox_logp_method = "a3po"
    with pytest.raises(TypeError, match=r"load it with areal_a3po\.load_config"):
        A3POTrainer(config)


def test_train_entry_point_validates_before_building_anything(tmp_path):
    # An invalid a3po setting stops `python -m areal_a3po.train` at load time, before any dataset,
    # tokenizer or worker is touched (the model/dataset paths in the YAML do not exist here).
    import subprocess
    import sys
    from pathlib import Path

    config = Path(__file__).parent.parent / "configs" / "gsm8k_a3po.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "areal_a3po.train", "--config", str(config), f"cluster.fileroot={tmp_path}", "actor.a3po.anchor=newest"],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "actor.a3po.anchor='newest' is not an anchor" in out.stderr


def test_synthetic_mode_prepares_model_paths_data_and_reward(tmp_path):
    # synthetic.model=tiny: a random model of the shipped shape under <fileroot>/synthetic/tiny, every
    # path that follows ${actor.path} pointing at it, synthetic prompts and the synthetic reward.
    from areal.utils.hf_utils import load_hf_tokenizer

    from areal_a3po.synthetic import reward_fn
    from areal_a3po.train import prepare

    argv = ["--config", "configs/gsm8k_a3po_2gpu.yaml", f"cluster.fileroot={tmp_path}", "total_train_steps=3",
            "synthetic.model=tiny"]
    run = prepare(argv)
    config, model_dir = run["config"], str(tmp_path / "synthetic" / "tiny")
    assert config.actor.path == config.tokenizer_path == config.sglang.model_path == model_dir
    assert (tmp_path / "synthetic" / "tiny" / "model.safetensors").exists()
    assert len(run["train_dataset"]) == 64 * 3  # batch_size x total_train_steps
    assert run["workflow_kwargs"]["reward_fn"] == "areal_a3po.synthetic.reward_fn"
    row = run["train_dataset"][0]
    prompt = load_hf_tokenizer(config.tokenizer_path).apply_chat_template(row["messages"], tokenize=False)
    assert reward_fn(prompt, row["answer"], [], [], row["answer"]) == 1.0
