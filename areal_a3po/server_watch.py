"""Watch the inference servers; end the run naming the one that stops answering.

AReaL 1.0.4 does not notice an inference server that dies or hangs during a run: its rollout worker
(the server's parent) stays alive, each rollout request fails after ``rollout.request_retries`` and
is dropped, and the trainer waits for a batch that never comes, for ever (measured on CPU: a
vLLM server SIGKILLed after step 2 of 8, the run still waiting 400 s later). The scheduler only
notices dead *workers* (``WorkerFailedError``).

``ServerWatch`` asks each server's ``/health`` (the health request of both AReaL backends, vLLM and
SGLang) every few seconds from a daemon thread of the controller. A server that has not answered
with a status below 500 for ``rollout.server_health_timeout`` seconds (refused, reset, no answer, a
5xx) is lost: the watch raises ``InferenceServerLost``, naming the server, in the main thread (a
signal to it, so that a blocking wait there is interrupted) and stops. The trainer's ``run`` then
stops every process and exits 1 (``areal_a3po.train``).
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

HEALTH_KEY = "rollout.server_health_timeout"
DEFAULT_HEALTH_TIMEOUT = 120.0
#: The signal the watch sends to the main thread to raise ``InferenceServerLost`` there.
WATCH_SIGNAL = signal.SIGUSR1


class InferenceServerLost(BaseException):
    """An inference server stopped answering during the run; the message names it and the key.

    A ``BaseException`` (like ``KeyboardInterrupt``), because it arrives asynchronously in whatever
    the main thread is doing, and AReaL's loops that catch ``Exception`` to log and retry must not
    swallow it."""


def health(address: str, timeout: float) -> str | None:
    """None when ``http://address/health`` answers with a status below 500 within ``timeout`` seconds;
    otherwise what happened instead (for the message)."""
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:  # refused, reset, timed out, unreachable
        reason = getattr(exc, "reason", exc)
        return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
    return None if status < 500 else f"HTTP {status}"


class ServerWatch:
    """A daemon thread that checks every ``interval`` seconds that each of ``addresses`` answers its
    ``/health``; when one has not for ``timeout`` seconds, ``lost`` holds the message and ``on_lost``
    is called once with it (``interrupt_main_thread`` by default)."""

    def __init__(self, addresses: list[str], timeout: float, *, interval: float | None = None,
                 on_lost: Callable[[str], None] | None = None, what: str = "inference server"):
        self.addresses = list(addresses)
        self.timeout = float(timeout)
        self.interval = interval if interval is not None else min(5.0, max(self.timeout / 4, 0.05))
        self.on_lost = on_lost or interrupt_main_thread
        self.what = what
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ServerWatch:
        self._thread = threading.Thread(target=self._run, name="a3po-server-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 5)

    def check(self) -> str | None:
        """One round now: the first server that does not answer and why (``address: reason``), or None."""
        for address in self.addresses:
            problem = health(address, timeout=min(max(self.interval, 1.0), 5.0))
            if problem is not None:
                return f"{address}: {problem}"
        return None

    def _run(self) -> None:
        last_ok = {a: time.monotonic() for a in self.addresses}
        while not self._stop.wait(self.interval):
            for address in self.addresses:
                problem = health(address, timeout=min(self.interval, 5.0))
                now = time.monotonic()
                if problem is None:
                    last_ok[address] = now
                    continue
                if now - last_ok[address] >= self.timeout and not self._stop.is_set():
                    self.lost = (
                        f"the {self.what} at {address} stopped answering during the run ({problem}; no answer "
                        f"to /health for {now - last_ok[address]:.0f} s, {HEALTH_KEY}={self.timeout:g}). Its log "
                        "is rollout.log in AReaL's log folder."
                    )
                    self._stop.set()
                    self.on_lost(self.lost)
                    return


def interrupt_main_thread(message: str) -> None:
    """Raise ``InferenceServerLost(message)`` in the main thread: a real signal, so that a blocking
    call there (a socket read, a lock) returns and the handler runs at once."""
    _pending.append(message)
    signal.pthread_kill(threading.main_thread().ident, WATCH_SIGNAL)


_pending: list[str] = []


def _raise_lost(signum, frame) -> None:
    if _pending:
        raise InferenceServerLost(_pending.pop())


def install_handler() -> bool:
    """Install the main thread's handler for ``WATCH_SIGNAL``; False where that cannot be done (not
    the main thread), and then a lost server is only logged."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(WATCH_SIGNAL, _raise_lost)
    return True
