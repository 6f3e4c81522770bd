"""Config loading: every shipped YAML, Hydra overrides, and each invalid setting's named error."""

import re
from pathlib import Path

import pytest

from areal_a3po import A3POActorConfig, A3POConfigError, A3POGRPOConfig, FallbackConfig, load_config
from areal_a3po.areal_compat import areal_prox_logp_methods

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
#: The CPU configs carry the harness's ``synthetic`` block (benchmarks.harness.train); the others are
#: plain experiments for ``python -m areal_a3po.train``.
SYNTHETIC = {p for p in CONFIGS if p.name.startswith("cpu_")}
GSM8K = next(p for p in CONFIGS if p.name == "gsm8k_a3po.yaml")


def _config_cls(path):
    from benchmarks.harness.train import SyntheticGRPOConfig

    return SyntheticGRPOConfig if path in SYNTHETIC else A3POGRPOConfig


def _load(tmp_path, *overrides, config=GSM8K):
    return load_config(["--config", str(config), f"cluster.fileroot={tmp_path}", *overrides], _config_cls(config))


def test_configs_exist():
    assert [p.name for p in CONFIGS] and all(p.suffix == ".yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(tmp_path, path):
    config, config_file = _load(tmp_path, config=path)
    assert isinstance(config, A3POGRPOConfig) and isinstance(config.actor, A3POActorConfig)
    assert config_file == str(path.absolute())
    if config.actor.prox_logp_method == "a3po":
        assert config.actor.use_decoupled_loss and not config.actor.should_compute_prox_logp()


def test_hydra_overrides_reach_the_a3po_block(tmp_path):
    config, _ = _load(
        tmp_path,
        "actor.a3po.anchor=recompute",
        "actor.a3po.interpolation=linear",
        "actor.a3po.audit_interval=10",
        "actor.a3po.fallback.threshold=0.05",
        "actor.a3po.fallback.metric=kl",
        "actor.a3po.fallback.patience=2",
        "actor.a3po.fallback.recover_after=5",
    )
    a3po = config.actor.a3po
    assert (a3po.anchor, a3po.interpolation, a3po.audit_interval) == ("recompute", "linear", 10)
    assert a3po.fallback == FallbackConfig(metric="kl", threshold=0.05, patience=2, recover_after=5)


def test_max_staleness_comes_from_the_rollout(tmp_path):
    config, _ = _load(tmp_path, "rollout.max_head_offpolicyness=3")
    assert config.actor.a3po.max_staleness == 3
    config, _ = _load(tmp_path, "rollout.max_head_offpolicyness=3", "actor.a3po.max_staleness=6")
    assert config.actor.a3po.max_staleness == 6


def test_recompute_keeps_arealsmeaning(tmp_path):
    config, _ = _load(tmp_path, "actor.prox_logp_method=recompute")
    assert config.actor.should_compute_prox_logp() and not config.actor.a3po_enabled


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["actor.use_decoupled_loss=false"], r"actor\.prox_logp_method=a3po needs the decoupled loss; set actor\.use_decoupled_loss=true"),
        (["actor.a3po.anchor=latest"], r"actor\.a3po\.anchor='latest' is not an anchor; set one of \['paper', 'recompute'\]"),
        (["actor.a3po.interpolation=cubic"], r"actor\.a3po\.interpolation='cubic' is not an interpolation; set one of \['linear', 'loglinear'\]"),
        # AReaL's own methods (2.0 adds reuse_train_logp), then a3po
        (["actor.prox_logp_method=a3p0"], r"actor\.prox_logp_method='a3p0' is unknown; set one of " + re.escape(str([*areal_prox_logp_methods(), "a3po"]))),
        (["actor.a3po.audit_interval=-1"], r"actor\.a3po\.audit_interval=-1 must be an integer ≥ 0"),
        (["actor.a3po.audit_interval=5", "actor.a3po.fallback.metric=mse"], r"actor\.a3po\.fallback\.metric='mse' is not an audit metric; set one of \['abs_error'"),
        (["actor.a3po.audit_interval=5", "actor.a3po.fallback.threshold=-0.5"], r"actor\.a3po\.fallback\.threshold=-0\.5 must be a finite number ≥ 0"),
        (["actor.a3po.audit_interval=5", "actor.a3po.fallback.patience=0"], r"actor\.a3po\.fallback\.patience=0 must be an integer ≥ 1"),
        (["actor.a3po.audit_interval=5", "actor.a3po.fallback.recover_after=-2"], r"actor\.a3po\.fallback\.recover_after=-2 must be an integer ≥ 0"),
        (["actor.a3po.fallback.threshold=0.1"], r"actor\.a3po\.fallback\.threshold is set but actor\.a3po\.audit_interval=0, so nothing is ever audited"),
        (["actor.a3po.max_staleness=-1"], r"actor\.a3po\.max_staleness=-1 must be an integer ≥ 0 or null"),
        (["actor.backend=megatron:d2p2t1"], r"actor\.backend='megatron:d2p2t1': actor\.prox_logp_method=a3po does not support pipeline parallelism yet \(p2\).* Use p1"),
    ],
)
def test_invalid_settings_name_the_key(tmp_path, overrides, message):
    with pytest.raises(A3POConfigError, match=message):
        _load(tmp_path, *overrides)


def test_pipeline_parallelism_is_refused_only_with_a3po(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the YAML's actor.a3po block, unused by recompute
        config, _ = _load(tmp_path, "actor.backend=megatron:d2p2t1", "actor.prox_logp_method=recompute")
    assert config.actor.backend == "megatron:d2p2t1"
    assert _load(tmp_path, "actor.backend=megatron:d4p1t2")[0].actor.backend == "megatron:d4p1t2"


def test_all_problems_are_reported_at_once(tmp_path):
    with pytest.raises(A3POConfigError) as info:
        _load(
            tmp_path,
            "actor.use_decoupled_loss=false",
            "actor.a3po.anchor=x",
            "actor.a3po.interpolation=y",
            "actor.a3po.fallback.patience=0",
            "actor.a3po.fallback.threshold=0.1",
        )
    # decoupled loss, anchor, interpolation, patience, and threshold without audit_interval
    assert len(info.value.problems) == 5


def test_sapo_is_rejected_with_a3po():
    # AReaL itself also rejects SAPO + decoupled loss; ours names the a3po conflict first.
    with pytest.raises(A3POConfigError, match=r"cannot be combined with actor\.use_sapo_loss=true"):
        A3POActorConfig(experiment_name="e", trial_name="t", use_decoupled_loss=True, prox_logp_method="a3po", use_sapo_loss=True)


def test_unknown_a3po_key_is_rejected(tmp_path):
    with pytest.raises(A3POConfigError, match=r"invalid experiment configuration:\n  - Could not override 'actor\.a3po\.anchr'\. .*\(Key 'anchr' is not in struct\)"):
        _load(tmp_path, "actor.a3po.anchr=paper")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["actor.ppo_n_minibatches=two"], r"Value 'two' of type 'str' could not be converted to Integer .*full_key: actor\.ppo_n_minibatches"),
        (["--config", "configs/missing.yaml"], r"Config file .*configs/missing\.yaml does not exist\. Pass an existing YAML with --config\."),
    ],
    ids=["wrong-type", "missing-file"],
)
def test_what_hydra_refuses_is_named(tmp_path, argv, message):
    if argv[0] == "--config":
        with pytest.raises(A3POConfigError, match=message):
            load_config([*argv, f"cluster.fileroot={tmp_path}"])
    else:
        with pytest.raises(A3POConfigError, match=message):
            _load(tmp_path, *argv)


def test_the_synthetic_block_is_the_harness_config_not_the_plugins(tmp_path):
    cpu = next(iter(SYNTHETIC))
    with pytest.raises(A3POConfigError, match=r"Key 'synthetic' not in 'A3POGRPOConfig'"):
        load_config(["--config", str(cpu), f"cluster.fileroot={tmp_path}"])


def test_a3po_options_without_the_method_warn(tmp_path):
    with pytest.warns(UserWarning, match=r"actor\.a3po is set .* so it is ignored; set actor\.prox_logp_method=a3po"):
        config, _ = _load(tmp_path, "actor.prox_logp_method=recompute", "actor.a3po.anchor=recompute")
    assert config.actor.prox_logp_method == "recompute"


def test_defaults_do_not_warn(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="actor.a3po is set")
        _load(tmp_path, "actor.prox_logp_method=recompute")
