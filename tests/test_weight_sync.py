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

import datetime
import http.server
import socket
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


@pytest.fixture
def peer():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PeerThatNeverJoins)
    _PeerThatNeverJoins.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _client(address: str):
    from areal.api.cli_args import InferenceEngineConfig
    from areal.engine.vllm_remote import RemotevLLMEngine

    engine = RemotevLLMEngine(InferenceEngineConfig(experiment_name="ws", trial_name="t", setup_timeout=10, request_retries=1,
                                                backend="vllm:d1p1t1"))
    engine.initialize(addr=address)
    return engine


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
    # AReaL 1.0.4's RPC turns a worker's exception into text: the local scheduler's EngineCallError
    # carries "Engine method '<name>' failed: <str(exc)>" (areal/infra/rpc/guard/engine_blueprint.py);
    # Ray's RPC server sends the traceback. The controller adds the servers' addresses.
    from areal.infra.scheduler.exceptions import EngineCallError

    from areal_a3po.trainer import _weight_sync_message
    from areal_a3po.weight_sync import group_error_message

    rank_message = group_error_message(
        RuntimeError("Timed out after 3 seconds waiting for clients. 1/2 clients joined."),
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
            found = _weight_sync_message(exc, ["10.0.0.2:30000"])
        assert found == rank_message.replace("server(s) did not", "server(s) 10.0.0.2:30000 did not")
    assert _weight_sync_message(RuntimeError("something else"), ["10.0.0.2:30000"]) is None
