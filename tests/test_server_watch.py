"""``ServerWatch``: a server that stops answering ``/health`` for ``rollout.server_health_timeout``
seconds is named, and the main thread is interrupted wherever it waits.

The servers here are real sockets on this machine: an HTTP server answering ``/health``, the same
server shut down (connection refused), one answering 503, and a socket that accepts connections
but never answers (a hung server). The real loop's check (a vLLM server SIGKILLed mid-run) is in
tests/test_faults.py.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from areal_a3po.server_watch import (
    HEALTH_KEY,
    InferenceServerLost,
    ServerWatch,
    health,
    install_handler,
    interrupt_main_thread,
)


def _server(status: int = 200):
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(status if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


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


def test_a_server_that_stops_answering_is_named_after_the_timeout_not_before(live):
    server, address = live
    lost: list[tuple[float, str]] = []
    watch = ServerWatch([address], timeout=1.0, interval=0.1, on_lost=lambda m: lost.append((time.monotonic(), m))).start()
    try:
        time.sleep(1.5)  # answering for longer than the timeout: nothing
        assert lost == [] and watch.lost is None
        stopped = time.monotonic()
        server.shutdown()
        server.server_close()
        deadline = time.monotonic() + 5
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watch.stop()
    assert len(lost) == 1, lost
    after = lost[0][0] - stopped
    assert 0.9 <= after < 2.5, after  # the last answer was ≤ 0.1 s before the shutdown; 1.0 s without one
    assert lost[0][1] == watch.lost
    assert lost[0][1].startswith(f"the inference server at {address} stopped answering during the run (ConnectionRefusedError")
    assert f"{HEALTH_KEY}=1)" in lost[0][1] and "rollout.log" in lost[0][1]


def test_a_stopped_watch_never_reports(live):
    server, address = live
    lost = []
    watch = ServerWatch([address], timeout=0.3, interval=0.05, on_lost=lost.append).start()
    watch.stop()  # what A3POTrainer.close does before AReaL stops the servers
    server.shutdown()
    time.sleep(0.6)
    assert lost == []


def test_the_main_thread_is_interrupted_in_a_blocking_wait():
    import signal

    from areal_a3po.server_watch import WATCH_SIGNAL

    previous = signal.getsignal(WATCH_SIGNAL)
    assert install_handler()
    try:
        timer = threading.Timer(0.2, interrupt_main_thread, args=("the inference server at h:1 stopped answering",))
        start = time.monotonic()
        timer.start()
        with pytest.raises(InferenceServerLost, match=r"^the inference server at h:1 stopped answering$"):
            threading.Event().wait(30)  # a lock wait: returns on the signal
        assert time.monotonic() - start < 5
    finally:
        signal.signal(WATCH_SIGNAL, previous)
    assert not issubclass(InferenceServerLost, Exception)  # AReaL's `except Exception` retries cannot swallow it


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
