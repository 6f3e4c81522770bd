"""``ServerWatch``: a server that stops answering for ``rollout.server_health_timeout`` seconds is
named, and the run is ended wherever it waits; the caller's signal handlers and proxies are left alone.

The servers here are real sockets on this machine: an HTTP server answering ``/health``, the same
server shut down (connection refused), one answering 503, and a socket that accepts connections
but never answers (a hung server). The real loop's checks (a server SIGKILLed mid-run; SGLang's
paused ``/health``) are in tests/test_faults.py and tests/test_sglang.py.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from areal_a3po.server_watch import WATCH_SIGNAL, HEALTH_KEY, InferenceServerLost, ServerWatch, health


class _V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _server(status: int = 200, host: str = "127.0.0.1"):
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(status if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = (_V6Server if ":" in host else http.server.ThreadingHTTPServer)((host, 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    from areal.utils.network import format_hostport

    return server, format_hostport(host, server.server_address[1])


@pytest.fixture
def live():
    server, address = _server()
    yield server, address
    server.shutdown()
    server.server_close()


def test_health_answers_none_for_a_live_server_and_says_what_else_happened(live):
    _, address = live
    assert health(address, timeout=2) is None
    failing, failing_address = _server(503)
    try:
        assert health(failing_address, timeout=2) == "HTTP 503"
    finally:
        failing.shutdown()
        failing.server_close()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert "ConnectionRefusedError" in health(f"127.0.0.1:{port}", timeout=2)
    with socket.socket() as hung:  # accepts (the kernel's backlog) and never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        start = time.monotonic()
        assert "timed out" in health(f"127.0.0.1:{hung.getsockname()[1]}", timeout=0.5)
        assert time.monotonic() - start < 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_probe_ignores_the_environments_proxy(live, monkeypatch):
    # A cluster's http_proxy is for the outside world; AReaL's own requests to its servers do not use
    # it, and the watch must not either (a proxy that cannot reach the server would end a healthy run).
    _, address = live
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert health(address, timeout=2) is None


def test_an_ipv6_servers_address_is_reached():
    from areal.api.io_struct import LocalInfServerInfo

    from areal_a3po.weight_sync import server_addresses

    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        server, address = _server(host="::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        class Controller:  # AReaL's rollout controller, as the trainer sees it: its servers' host and port
            server_infos = [LocalInfServerInfo(host="::1", port=server.server_address[1], process=None)]

        addresses = server_addresses(Controller())
        assert addresses == [address] == [f"[::1]:{server.server_address[1]}"]
        assert health(addresses[0], timeout=2) is None
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_that_stops_answering_is_named_after_the_timeout_not_before(live):
    server, address = live
    lost: list[tuple[float, str]] = []
    watch = ServerWatch([address], timeout=2.0, on_lost=lambda m: lost.append((time.monotonic(), m))).start()
    assert watch.probe_timeout >= 1.0  # a busy machine's slow answer is not a lost server
    try:
        time.sleep(3.0)  # answering for longer than the timeout: nothing
        assert lost == [] and watch.lost is None
        stopped = time.monotonic()
        server.shutdown()
        server.server_close()
        deadline = time.monotonic() + 15
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watch.stop()
    assert len(lost) == 1, lost
    # Named once the watch has seen no answer for the timeout (its own clock, in the message), and
    # soon after: within the timeout, a probe and an interval (generous bounds for a busy machine).
    assert lost[0][1] == watch.lost
    assert lost[0][1].startswith(f"the inference server at {address} stopped answering during the run (ConnectionRefusedError")
    waited = int(lost[0][1].split("no answer to /health for ")[1].split(" s")[0])
    assert waited >= 2
    assert lost[0][0] - stopped < 2.0 + watch.probe_timeout + watch.interval + 5
    assert f"{HEALTH_KEY}=2)" in lost[0][1] and "rollout.log" in lost[0][1]


def test_a_stopped_watch_never_reports(live):
    server, address = live
    lost = []
    watch = ServerWatch([address], timeout=0.3, interval=0.05, on_lost=lost.append).start()
    watch.stop()  # what A3POTrainer.close does before AReaL stops the servers
    server.shutdown()
    time.sleep(0.6)
    assert lost == []


def test_the_main_thread_is_interrupted_in_a_blocking_wait_and_the_callers_handler_is_kept(live):
    import signal

    server, address = live
    foreign: list[int] = []
    previous = signal.signal(WATCH_SIGNAL, lambda signum, frame: foreign.append(signum))  # the caller's (Slurm's notice, say)
    try:
        watch = ServerWatch([address], timeout=1.0).start()
        # A WATCH_SIGNAL that is not the watch's reaches the caller's handler, as without the watch.
        signal.raise_signal(WATCH_SIGNAL)
        assert foreign == [WATCH_SIGNAL]
        server.shutdown()
        server.server_close()
        start = time.monotonic()
        with pytest.raises(InferenceServerLost, match=rf"^the inference server at {address} stopped answering"):
            threading.Event().wait(60)  # a lock wait: returns on the signal
        assert time.monotonic() - start < 30
        watch.stop()
        handler = signal.getsignal(WATCH_SIGNAL)
        signal.raise_signal(WATCH_SIGNAL)  # the caller's handler is back
        assert foreign == [WATCH_SIGNAL] * 2 and handler is not None
    finally:
        signal.signal(WATCH_SIGNAL, previous)
    assert not issubclass(InferenceServerLost, Exception)  # AReaL's `except Exception` retries cannot swallow it


def test_a_lost_server_is_raised_again_until_the_watch_stops_where_the_first_is_swallowed(live):
    # Seen with SGLang: the watch's exception landed in aiohttp's data_received, which turned it into a
    # ClientPayloadError; AReaL's RPC retried, and the run went on unwatched to exit 0. Here the main
    # thread swallows the first two, as such a retry would; the watch raises again until it is stopped.
    server, address = live
    watch = ServerWatch([address], timeout=1.0).start()
    server.shutdown()
    server.server_close()
    swallowed = 0
    try:
        with pytest.raises(InferenceServerLost, match=rf"^the inference server at {address} stopped answering"):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    threading.Event().wait(0.5)
                except InferenceServerLost:
                    if swallowed < 2:
                        swallowed += 1  # swallowed, as aiohttp and AReaL's retry did
                        continue
                    raise
    finally:
        watch.stop()
    assert swallowed == 2
    threading.Event().wait(watch.interval * 3)  # stopped: nothing more arrives


_SPMD_RANK = """
import os, socket, sys, time, datetime
import torch, torch.distributed as dist
from areal_a3po.server_watch import ServerWatch
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=300))
if rank == 1:
    time.sleep(120)  # never joins rank 0's collective: rank 0 waits inside gloo, in C++
else:
    ServerWatch([f"127.0.0.1:{sys.argv[3]}"], timeout=1.0, single_controller=False).start()
    dist.all_reduce(torch.ones(1))
    print("the collective returned", flush=True)
"""


def test_in_spmd_mode_a_rank_blocked_in_a_collective_exits_naming_the_server():
    # A Python signal handler runs only when the main thread returns to Python: a rank blocked in a
    # collective (here gloo's, on CUDA NCCL's) would never see InferenceServerLost. In SPMD mode the
    # watch ends the rank's process itself (the launcher then stops the other ranks).
    import subprocess
    import sys

    from helpers import REPO

    port, dead = _free_port(), _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _SPMD_RANK, str(rank), str(port), str(dead)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        start = time.monotonic()
        out, err = procs[0].communicate(timeout=120)
        elapsed = time.monotonic() - start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert procs[0].returncode == 1, err[-2000:]
    assert f"areal_a3po: the inference server at 127.0.0.1:{dead} stopped answering during the run (ConnectionRefusedError" in err
    assert "This rank exits now (status 1)." in err and "the collective returned" not in out
    assert elapsed < 90, elapsed


def test_server_health_timeout_is_validated_at_load():
    from areal_a3po.config import A3POConfigError, load_config

    from benchmarks.harness.train import SyntheticGRPOConfig
    from helpers import CPU_TINY

    for bad in ("-1", "-0.5"):
        with pytest.raises(A3POConfigError, match=r"invalid experiment configuration:\n  - rollout\.server_health_timeout="
                           r"-\S+ must be a number of seconds ≥ 0 \(0 = no watch; default 120\)"):
            load_config(["--config", str(CPU_TINY), f"+rollout.server_health_timeout={bad}"], SyntheticGRPOConfig)
    config, _ = load_config(["--config", str(CPU_TINY), "+rollout.server_health_timeout=0"], SyntheticGRPOConfig)
    assert config.rollout.server_health_timeout == 0
