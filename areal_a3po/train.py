"""``python -m areal_a3po.train --config EXPERIMENT.yaml [hydra overrides]``

AReaL's RLVR entry point (``RLVRWorkflow``, a verifiable reward) with the plugin: the config is
loaded by ``areal_a3po.load_config`` (so ``actor.prox_logp_method: a3po`` and ``actor.a3po`` are
understood and validated before anything starts) and the trainer is ``A3POTrainer``. Launch it the
way AReaL experiments are launched (``scheduler.type: local`` or ``ray`` in the YAML); the model
and the dataset are local paths from the config (``actor.path``, ``train_dataset.path``), and the
reward is AReaL's GSM8K reward unless ``A3PO_REWARD_FN=module.function`` says otherwise.

The steps, each usable on its own (``benchmarks/harness/train.py`` swaps in its own inputs; a
notebook or a launcher of the user's can call them):

- ``load(argv)``: the validated config, after ``areal_a3po.preflight`` has checked what would
  otherwise fail late and far away (the inference server's package and settings);
- ``inputs(config)``: the datasets and the workflow's arguments (``Inputs``);
- ``run(inputs)``: AReaL's trainer loop; returns the exit status. Whatever happens (an error, Ctrl-C,
  SIGTERM) every process the run started is stopped, and only those; the caller's signal handlers
  and environment are as they were.

``main`` is the command line: a bad config or a failed preflight prints the named problems and exits
2 without a traceback; a failed run exits 1 (130/143 after Ctrl-C/SIGTERM) with its cause in one line
where the plugin can name it (``areal_a3po.failures``), at once (``exit_now``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

from areal_a3po.preflight import PreflightError, preflight, server_path

#: AReaL's GSM8K reward (areal.reward.gsm8k); override with A3PO_REWARD_FN=module.function.
DEFAULT_REWARD_FN = "areal.reward.gsm8k.gsm8k_reward_fn"
WORKFLOW = "areal.workflow.rlvr.RLVRWorkflow"


@dataclass
class Inputs:
    """What ``PPOTrainer`` and ``PPOTrainer.train`` take besides the code: config, data, workflow arguments."""

    config: Any
    train_dataset: Any
    valid_dataset: Any = None
    workflow_kwargs: dict = field(default_factory=dict)
    eval_workflow_kwargs: dict = field(default_factory=dict)


def load(argv: list[str], config_cls: type | None = None):
    """The experiment config from ``--config FILE.yaml`` and Hydra overrides, validated and preflighted;
    every AReaL private name the plugin uses is checked before anything starts."""
    from areal_a3po.areal_compat import check_private_names
    from areal_a3po.config import A3POGRPOConfig, load_config

    config, _ = load_config(argv, config_cls or A3POGRPOConfig)
    check_private_names()
    preflight(config)
    return config


def workflow_kwargs(config, reward_fn: str) -> tuple[dict, dict]:
    """``RLVRWorkflow``'s arguments for training and evaluation (temperature 0.6).

    Exactly the arguments of AReaL 1.0.4's ``RLVRWorkflow.__init__`` (reward_fn, gconfig, tokenizer,
    enable_thinking): the workers build the workflow from them at the first rollout, so an argument
    it does not take crashes the run there. Trajectory dumps are AReaL's ``rollout.dump_to_file``.
    """
    train = dict(reward_fn=reward_fn, gconfig=config.gconfig, tokenizer=config.tokenizer_path, enable_thinking=False)
    return train, dict(train, gconfig=config.gconfig.new(temperature=0.6))


def inputs(config) -> Inputs:
    """The config's datasets (AReaL's ``get_custom_dataset``) and the workflow's arguments."""
    from areal.dataset import get_custom_dataset
    from areal.utils.hf_utils import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(config.tokenizer_path)
    train_dataset = get_custom_dataset("train", config.train_dataset, tokenizer)
    valid_dataset = get_custom_dataset("test", config.valid_dataset, tokenizer) if config.valid_dataset else None
    train, evaluate = workflow_kwargs(config, os.environ.get("A3PO_REWARD_FN", DEFAULT_REWARD_FN))
    return Inputs(config, train_dataset, valid_dataset, train, evaluate)


def run(job: Inputs, trainer_cls: type | None = None, prog: str = "areal_a3po.train") -> int:
    """AReaL's trainer loop on ``job``; returns the exit status: 0 done; 1 failed, with the cause in one
    line on stderr where the plugin can name it (``failures.RunFailure``, or a server lost during the
    run: ``rollout.server_health_timeout``), else AReaL's traceback; 130/143 after Ctrl-C/SIGTERM.

    Whatever happens, before it returns: every process the run started is stopped (AReaL's workers, the
    inference server and its engine processes, also those that left the process tree, a Ray head the
    run started), and nothing else; SIGTERM's handler and ``PATH`` are the caller's again."""
    from areal_a3po import processes
    from areal_a3po.failures import RunFailure
    from areal_a3po.server_watch import InferenceServerLost
    from areal_a3po.trainer import A3POTrainer

    trainer_cls = trainer_cls or A3POTrainer
    before = set(processes.descendants())
    trainer = None
    status, line = 0, None
    try:
        with _run_environment(job.config):
            try:
                with trainer_cls(job.config, train_dataset=job.train_dataset, valid_dataset=job.valid_dataset) as trainer:
                    trainer.train(
                        workflow=WORKFLOW,
                        workflow_kwargs=job.workflow_kwargs,
                        eval_workflow=WORKFLOW,
                        eval_workflow_kwargs=job.eval_workflow_kwargs,
                    )
            finally:
                started = [p for p in processes.descendants() if p not in before]
                processes.stop(started + list(getattr(trainer, "started_processes", ())))
    except (RunFailure, InferenceServerLost) as exc:
        resumable = getattr(exc, "resumable", True)
        status, line = 1, f"{exc} Every worker and the server have been stopped.{_resume_hint(job.config) if resumable else ''}"
    except Exception:
        traceback.print_exc()
        status, line = 1, "the run stopped on the error above; every worker and the server have been stopped."
    except KeyboardInterrupt:
        status, line = 130, "interrupted; the run's workers and server have been stopped."
    except SystemExit as exc:  # SIGTERM (_exit_on_sigterm), or a sys.exit inside AReaL
        status = exc.code if isinstance(exc.code, int) else 1
        line = "interrupted; the run's workers and server have been stopped."
    if line is not None:
        print(f"{prog}: {line}", file=sys.stderr)
    return status


@contextlib.contextmanager
def _run_environment(config):
    """While the run lasts: SIGTERM raises ``SystemExit(143)`` (so that the run's processes are
    stopped; Python's default would end the process at once), ``PATH`` leads to this interpreter for the
    server (``preflight.server_path``), and a Ray head is running where the run needs one of its own.
    All as before afterwards."""
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if _main_thread() else None
    path_before, path = os.environ.get("PATH"), server_path()
    if path is not None:
        os.environ["PATH"] = path  # inherited by the scheduler's workers and the server they launch
    ray_started = _start_ray_head(config)
    try:
        yield
    finally:
        if ray_started:
            import ray

            ray.shutdown()
        if path is not None:
            if path_before is None:
                os.environ.pop("PATH", None)
            else:
                os.environ["PATH"] = path_before
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _resume_hint(config) -> str:
    if config.recover.mode in ("on", "auto"):
        return f" Run the same command again to resume from the last recover checkpoint (recover.mode={config.recover.mode})."
    return " To be able to resume after such a failure, set recover.mode=on and recover.freq_steps."


def _exit_on_sigterm(signum, frame):
    # Python's default SIGTERM ends the process without running `finally`, which would leave the
    # workers and the server running; raise instead so that run() stops them.
    raise SystemExit(128 + signum)


def _start_ray_head(config) -> bool:
    """For ``scheduler.type: ray`` with no cluster given (``RAY_ADDRESS`` unset), start a local Ray
    head now, without the dashboard (which would need port 8265), so that this run owns it and
    stops it. With ``RAY_ADDRESS`` set, AReaL's RayScheduler joins that cluster as usual."""
    if config.scheduler.type != "ray" or os.environ.get("RAY_ADDRESS"):
        return False
    import ray

    if ray.is_initialized():
        return False
    ray.init(include_dashboard=False, log_to_driver=True)
    return True


def main(argv: list[str]) -> int:
    """Load and check the config, build the inputs, run AReaL's trainer loop; the exit status is the result."""
    from areal_a3po.config import A3POConfigError

    try:
        job = inputs(load(argv))
    except (A3POConfigError, PreflightError) as exc:
        hint = ""
        if "Key 'synthetic'" in str(exc):
            hint = ("\nThe `synthetic` block (a random model and synthetic prompts, configs/cpu_tiny.yaml) is read by "
                    "the repository's benchmark entry point: python -m benchmarks.harness.train --config ...")
        print(f"areal_a3po.train: {exc}{hint}", file=sys.stderr)
        return 2
    return run(job)


def exit_now(status: int) -> None:
    """End the command line's process with ``status``: through the interpreter's exit after success; at
    once after a failure, when the run's processes are stopped already. After a failure AReaL (1.0.4,
    2.0.0) can leave a thread that never ends, which the interpreter's exit would wait for: its
    LocalScheduler.__del__ deleting the stopped workers again from a thread started during
    finalisation, or its data service's start-up thread polling a data worker it had deleted."""
    if status == 0:
        sys.exit(0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
