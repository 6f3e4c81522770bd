"""The xccl weight-update group forms within ``actor.weight_update_group_timeout`` or fails naming it.

AReaL's own FSDP actor (the plugin's, on the tiny Qwen2) and AReaL's own vLLM client
(``RemotevLLMEngine``) go through AReaL's ``connect_engine`` exactly as the trainer does. The peer
is a stand-in HTTP server: it answers ``/health`` like a live vLLM server and accepts the request to
join the group, but never joins. That is what the trainer sees when a real server cannot reach the
trainer's address or hangs, which no CPU machine can stage with a real server without root
(a firewall) or racing its start (SIGSTOP). AReaL 1.0.4 would wait 7200 s here
(``DIST_GROUP_DEFAULT_TIMEOUT``); without ``BoundedWeightSyncMixin`` the first test hangs.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from benchmarks.harness.actor import make_actor

pytestmark = pytest.mark.integration


class _PeerThatNeverJoins(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def _reply(self, status: int, body: bytes = b'{"success": true}') -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's name
        self._reply(200 if self.path == "/health" else 404)

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).requests.append(self.path)
        self._reply(200)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serving(handler):
    """``handler`` (an ``http.server`` handler class) serving on a free local port; yields its address."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def peer():
    _PeerThatNeverJoins.requests = []
    with _serving(_PeerThatNeverJoins) as address:
        yield address


def _client(address: str):
    from areal.api.cli_args import InferenceEngineConfig
    from areal.engine.vllm_remote import RemotevLLMEngine

    engine = RemotevLLMEngine(InferenceEngineConfig(experiment_name="ws", trial_name="t", setup_timeout=10, request_retries=1,
                                                backend="vllm:d1p1t1"))
    engine.initialize(addr=address)
    return engine


def _sglang_client(address: str):
    """AReaL's own SGLang client (it speaks HTTP only: no SGLang needed in this venv)."""
    from areal.api.cli_args import InferenceEngineConfig
    from areal.engine.sglang_remote import RemoteSGLangEngine

    engine = RemoteSGLangEngine(InferenceEngineConfig(experiment_name="ws", trial_name="t", setup_timeout=10, request_retries=1,
                                                  backend="sglang:d1p1t1"))
    engine.initialize(addr=address)
    return engine


def _xccl_meta_sglang():
    from areal.api.alloc_mode import ModelAllocation
    from areal.api.io_struct import WeightUpdateMeta

    return WeightUpdateMeta.from_fsdp_xccl(gen_allocation=ModelAllocation.from_str("sglang:d1p1t1", name="rollout"))


def _xccl_meta():
    from areal.api.alloc_mode import ModelAllocation
    from areal.api.io_struct import WeightUpdateMeta

    return WeightUpdateMeta.from_fsdp_xccl(gen_allocation=ModelAllocation.from_str("vllm:d1p1t1", name="rollout"))


def _connect_fails(actor, peer: str, match: str) -> float:
    """AReaL's ``connect_engine`` of ``actor`` to a vLLM client of ``peer`` over xccl must raise a
    ``WeightSyncError`` matching ``match``; the seconds it took. Client and actor are destroyed after."""
    from areal_a3po.weight_sync import WeightSyncError

    client = _client(peer)
    try:
        start = time.monotonic()
        with pytest.raises(WeightSyncError, match=match):
            actor.connect_engine(client, _xccl_meta())
        return time.monotonic() - start
    finally:
        client.destroy()
        actor.destroy()


def test_a_server_that_never_joins_ends_the_group_within_the_timeout_naming_it(tiny_model, peer):
    import areal.engine.fsdp_engine as fsdp_engine

    actor = make_actor(tiny_model, prox_logp_method="a3po", weight_update_group_timeout=2.0)
    elapsed = _connect_fails(actor, peer, (
        rf"inference server\(s\) {peer} did not join the trainer's weight-update group at tcp://\S+:\d+ "
        r"within actor\.weight_update_group_timeout=2 s \(Timed out .*1/2 clients joined.*raise "
        r"actor\.weight_update_group_timeout; otherwise set actor\.weight_update_mode=disk"
    ))
    # torch reports "Timed out after 3 seconds" for a 2 s store timeout; AReaL's value is 7200 s.
    assert 2.0 <= elapsed < 15.0, elapsed
    assert "/areal_init_weights_update_group" in _PeerThatNeverJoins.requests  # the server was asked to join
    assert fsdp_engine.DIST_GROUP_DEFAULT_TIMEOUT == datetime.timedelta(seconds=7200)  # AReaL's value is back


def test_a_port_taken_before_the_trainer_binds_it_is_named(tiny_model, peer, monkeypatch):
    # AReaL probes for a free port, then binds it for the rendezvous; another process can take it in
    # between. The race is forced here: AReaL's probe is made to return a port this test holds.
    import areal.engine.fsdp_engine as fsdp_engine

    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setattr(fsdp_engine, "find_free_ports", lambda n, *a, **k: [port])
        actor = make_actor(tiny_model, prox_logp_method="recompute", weight_update_group_timeout=30.0)
        elapsed = _connect_fails(actor, peer, (
            rf"could not open the weight-update group at tcp://\S+:{port}: the port was taken .*EADDRINUSE.*"
            r"Run again .*or set actor\.weight_update_mode=disk"
        ))
        assert elapsed < 10.0  # at once, not after the timeout


def test_weight_update_group_timeout_is_validated_at_load():
    from areal_a3po.config import A3POActorConfig, A3POConfigError

    for bad in (0, -5.0, "soon"):
        with pytest.raises(A3POConfigError, match=r"actor\.weight_update_group_timeout=.* must be a number of seconds > 0"):
            A3POActorConfig(weight_update_group_timeout=bad)


def test_the_controller_finds_the_ranks_message_in_the_error_areals_rpc_makes_of_it():
    # AReaL's RPC turns a worker's exception into text: the local scheduler's EngineCallError carries
    # "Engine method '<name>' failed: <str(exc)>" (areal/infra/rpc/guard/engine_blueprint.py); Ray's RPC
    # server sends the traceback. The controller adds the servers' addresses, which only it knows.
    import torch.distributed as dist
    from areal.infra.scheduler.exceptions import EngineCallError

    from areal_a3po.weight_sync import WeightSyncError, from_rpc_error, group_error_message

    rank_message = group_error_message(
        dist.DistStoreError("Timed out after 3 seconds waiting for clients. 1/2 clients joined."),
        servers=None, host="10.0.0.1", port=12345, timeout=2.0,
    )
    assert rank_message.startswith("actor.weight_update_mode=xccl: the inference server(s) did not join")
    local = EngineCallError("actor/0", "connect_engine", f"Engine method 'connect_engine' failed: {rank_message}")
    ray = RuntimeError("Error in connect_engine:\nTraceback (most recent call last):\n  File ...\n"
                       f"areal_a3po.weight_sync.WeightSyncError: {rank_message}\n")
    for raised in (local, ray):
        try:
            raise RuntimeError("PPOTrainer.__init__ failed") from raised
        except RuntimeError as exc:
            found = from_rpc_error(exc, ["10.0.0.2:30000"])
        assert isinstance(found, WeightSyncError)
        assert str(found) == f"{rank_message} The rollout's servers: 10.0.0.2:30000."
    assert from_rpc_error(RuntimeError("something else"), ["10.0.0.2:30000"]) is None


def test_group_errors_are_named_by_their_type():
    import torch.distributed as dist

    from areal_a3po.weight_sync import group_error_message

    def message(exc, **kw):
        return group_error_message(exc, servers=["[::1]:30000"], host="::1", port=4242, timeout=9.0, **kw)

    assert "could not open the weight-update group at tcp://[::1]:4242: the port was taken" in message(
        dist.DistNetworkError("The server socket has failed to listen on any local network address."))
    timed_out = message(dist.DistStoreError("Timed out after 10 seconds waiting for clients. 1/2 clients joined."),
                        refused="HTTP 400: Failed to init process group: connection refused by 10.0.0.1")
    assert "the inference server(s) [::1]:30000 did not join the trainer's weight-update group at tcp://[::1]:4242 within " \
           "actor.weight_update_group_timeout=9 s" in timed_out
    assert "The server answered the request to join: HTTP 400: Failed to init process group: connection refused by 10.0.0.1." in timed_out
    # A message text alone (what the old code matched) is not a type: named as a failure of its own.
    assert "failed to form (RuntimeError: Timed out" in message(RuntimeError("Timed out after 10 seconds"))


def _two_ranks_connect(rank: int, world: int, model: str, peer: str) -> object:
    """Both trainer ranks of a two-rank FSDP actor connect to a server that never joins: AReaL's rank 1
    returns from forming the group at once and waits in its next barrier (7200 s) for rank 0."""
    import time

    from benchmarks.harness.actor import make_actor

    actor = make_actor(model, prox_logp_method="a3po", data_parallel_size=world, weight_update_group_timeout=2.0)
    client = _client(peer)
    try:
        return connect_timed(actor, client, _xccl_meta())
    finally:
        client.destroy()


def connect_timed(actor, client, meta) -> tuple[str, str, float]:
    """``actor.connect_engine(client, meta)``: (the error's type name or "joined", its message, seconds)."""
    start = time.monotonic()
    try:
        actor.connect_engine(client, meta)
    except Exception as exc:  # noqa: BLE001 - the rank's result
        return type(exc).__name__, str(exc), time.monotonic() - start
    return "joined", "", time.monotonic() - start


def test_every_trainer_rank_raises_the_named_error_when_the_group_does_not_form(tiny_model, peer):
    from helpers import run_ranks

    out = run_ranks(_two_ranks_connect, str(tiny_model), peer, timeout=150)
    for rank, (kind, message, elapsed) in enumerate(out):
        assert kind == "WeightSyncError", (rank, message)
        assert "did not join the trainer's weight-update group" in message and "[rank 0 of 2; every rank stops]" in message
        assert elapsed < 30, (rank, elapsed)  # AReaL alone: rank 1 waits 7200 s in its barrier


_JOINER = """\
import datetime, json, sys
from areal.engine.core.distributed import init_custom_process_group as join
print("ready", flush=True)
body = json.loads(sys.stdin.readline())
join(backend="gloo", world_size=2, rank=1, group_name=body["group_name"],
     init_method=f"tcp://{body['master_address']}:{body['master_port']}", timeout=datetime.timedelta(seconds=60))
"""


class _PeerThatJoinsAndLeaves(_PeerThatNeverJoins):
    """Joins the group (a real process, rank 1 of the rendezvous) when asked, then exits: the trainer's
    next broadcast on the group fails (a server that died, or NCCL unable to connect at the first push).

    The joining process is started, and its imports done, before the test asks (``leaving_peer``):
    importing AReaL takes 16-23 s on an idle 2-core machine, more beside another test, and a joiner
    started only when asked once arrived after the trainer's group timeout (CI, AReaL 2.0.0)."""

    joiner: subprocess.Popen | None = None

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}"
        type(self).requests.append(self.path)
        if "init_weights_update_group" in self.path:
            type(self).joiner.stdin.write(json.dumps(json.loads(body)).encode() + b"\n")
            type(self).joiner.stdin.flush()
        self._reply(200)


@pytest.fixture
def leaving_peer():
    joiner = subprocess.Popen([sys.executable, "-c", _JOINER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    _PeerThatJoinsAndLeaves.requests, _PeerThatJoinsAndLeaves.joiner = [], joiner
    try:
        while (line := joiner.stdout.readline()) not in (b"ready\n", b""):  # past any line AReaL logs
            pass
        assert line, "the joining process failed to import AReaL"
        with _serving(_PeerThatJoinsAndLeaves) as address:
            yield address
    finally:
        joiner.kill()
        joiner.wait()


def test_a_push_on_the_group_that_fails_is_named(tiny_model, leaving_peer):
    from areal_a3po.weight_sync import WeightSyncError

    actor = make_actor(tiny_model, prox_logp_method="a3po", weight_update_group_timeout=60.0)
    client = _client(leaving_peer)
    try:
        actor.connect_engine(client, _xccl_meta())  # the peer joined ...
        _PeerThatJoinsAndLeaves.joiner.wait(timeout=60)  # ... and is gone
        with pytest.raises(WeightSyncError, match=r"^actor\.weight_update_mode=xccl: a weight push to the inference server\(s\) .* "
                           r"over the weight-update group failed \(RuntimeError: .*Connection closed by peer.*\)\. NCCL connects at the first push"):
            actor.update_weights(_xccl_meta().with_version(1))
    finally:
        client.destroy()
        actor.destroy()
