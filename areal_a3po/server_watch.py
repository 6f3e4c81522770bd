"""Watch the inference servers during a run; end the run naming the one that stops answering.

AReaL (1.0.4, 2.0.0) does not notice an inference server that dies or hangs during a run: its rollout
worker (the server's parent) stays alive, each rollout request fails after ``rollout.request_retries``
and is dropped, and the trainer waits for a batch that never comes, for ever. Its scheduler notices
dead *workers* only.

``ServerWatch`` sends each server a request that answers at once while the server lives, also while
its generation is paused (``servers.ServerKind.probe_path``: vLLM's ``/health``, SGLang's
``/server_info``), every few seconds from a daemon thread, without any proxy of the environment (as
AReaL's own requests). A server that has not answered with a status below 500 for
``rollout.server_health_timeout`` seconds (refused, reset, no answer, a 5xx) is lost: ``lost`` holds
the message naming it, and the watch ends the run:

- single controller (AReaL's default): ``InferenceServerLost`` is raised in the main thread, by a
  signal (``WATCH_SIGNAL``) so that a blocking wait there returns, and raised again every
  ``interval`` until the watch is stopped (``A3POTrainer``'s teardown stops it): where it lands in
  code that swallows it (aiohttp turns an exception raised in its ``data_received`` into a
  ``ClientPayloadError``, which AReaL's RPC retries), the next one ends the run. The entry point then
  stops every process and exits 1. The watch's signal handler is installed while the watch runs and the
  previous one is restored after; a ``WATCH_SIGNAL`` that is not the watch's (Slurm's
  ``--signal=USR1`` preemption notice) goes to the previous handler;
- SPMD mode (every trainer rank runs the script and watches the servers): the rank prints the message
  and exits with status 1 at once. A rank blocked in a collective cannot run a Python signal handler
  until the collective returns, and one rank leaving alone would leave the others waiting in theirs;
  the launcher (torchrun) stops the others when one exits;
- outside the main thread (a library caller's thread): the message is logged only.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

HEALTH_KEY = "rollout.server_health_timeout"
DEFAULT_HEALTH_TIMEOUT = 120.0
#: The signal the watch sends to the main thread to raise ``InferenceServerLost`` there.
WATCH_SIGNAL = signal.SIGUSR1

#: Requests go straight to the servers, whatever ``http_proxy`` says (AReaL's clients do not use it either).
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class InferenceServerLost(BaseException):
    """An inference server stopped answering during the run; the message names it and the key.

    A ``BaseException`` (like ``KeyboardInterrupt``), because it arrives asynchronously in whatever
    the main thread is doing, and AReaL's loops that catch ``Exception`` to log and retry must not
    swallow it."""


def health(address: str, timeout: float, path: str = "/health") -> str | None:
    """None when ``http://<address><path>`` answers with a status below 500 within ``timeout`` seconds;
    otherwise what happened instead (for the message). ``address`` is ``host:port`` (an IPv6 host in
    brackets, as AReaL's ``format_hostport`` writes it)."""
    try:
        with _DIRECT.open(f"http://{address}{path}", timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:  # refused, reset, timed out, unreachable
        reason = getattr(exc, "reason", exc)
        return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
    return None if status < 500 else f"HTTP {status}"


class ServerWatch:
    """A daemon thread that checks every ``interval`` seconds that each of ``addresses`` answers
    ``probe_path`` within ``probe_timeout``; when one has not for ``timeout`` seconds, ``lost`` holds
    the message and ``on_lost`` is called once with it. Without ``on_lost``: see the module's docstring
    (``single_controller``: AReaL's single-controller mode, else SPMD)."""

    def __init__(self, addresses: list[str], timeout: float, *, probe_path: str = "/health", interval: float | None = None,
                 probe_timeout: float | None = None, on_lost: Callable[[str], None] | None = None,
                 single_controller: bool = True, what: str = "inference server"):
        self.addresses = list(addresses)
        self.timeout = float(timeout)
        self.probe_path = probe_path
        self.interval = interval if interval is not None else min(5.0, max(self.timeout / 4, 0.05))
        self.probe_timeout = probe_timeout if probe_timeout is not None else min(5.0, max(self.timeout / 2, 1.0))
        self.what = what
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._interrupt: _MainThreadInterrupt | None = None
        if on_lost is not None:
            self.on_lost = on_lost
        elif not single_controller:
            self.on_lost = exit_process
        elif threading.current_thread() is threading.main_thread():
            self._interrupt = _MainThreadInterrupt()
            self.on_lost = self._interrupt.raise_in_main_thread
        else:
            self.on_lost = _log_only

    def start(self) -> ServerWatch:
        if self._interrupt is not None:
            self._interrupt.install()
        self._thread = threading.Thread(target=self._run, name="a3po-server-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop checking (a lost server is reported no more) and give the signal back its previous handler."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + self.probe_timeout + 5)
        if self._interrupt is not None:
            self._interrupt.restore()

    def check(self) -> str | None:
        """One round now: the first server that does not answer and why (``address: reason``), or None."""
        for address in self.addresses:
            problem = health(address, self.probe_timeout, self.probe_path)
            if problem is not None:
                return f"{address}: {problem}"
        return None

    def _run(self) -> None:
        last_ok = {a: time.monotonic() for a in self.addresses}
        while not self._stop.wait(self.interval):
            for address in self.addresses:
                problem = health(address, self.probe_timeout, self.probe_path)
                now = time.monotonic()
                if problem is None:
                    last_ok[address] = now
                    continue
                if now - last_ok[address] >= self.timeout and not self._stop.is_set():
                    self.lost = (
                        f"the {self.what} at {address} stopped answering during the run ({problem}; no answer "
                        f"to {self.probe_path} for {now - last_ok[address]:.0f} s, {HEALTH_KEY}={self.timeout:g}). "
                        "Its log is rollout.log in AReaL's log folder."
                    )
                    self._report()
                    return

    def _report(self) -> None:
        """``on_lost(lost)``; in the main thread, again every ``interval`` until ``stop`` (the first may land
        where it is swallowed)."""
        self.on_lost(self.lost)
        while self._interrupt is not None and not self._stop.wait(self.interval):
            self.on_lost(self.lost)


class _MainThreadInterrupt:
    """``WATCH_SIGNAL``'s handler while a watch runs: raises ``InferenceServerLost`` in the main thread for
    the watch's message, and passes any other ``WATCH_SIGNAL`` to the handler that was there before."""

    def __init__(self) -> None:
        self._pending: list[str] = []
        self._previous = None
        self._installed = False

    def install(self) -> None:
        self._previous = signal.signal(WATCH_SIGNAL, self._handle)
        self._installed = True

    def restore(self) -> None:
        if self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(WATCH_SIGNAL, self._previous)
            self._installed = False

    def raise_in_main_thread(self, message: str) -> None:
        """A real signal, so that a blocking call in the main thread (a socket read, a lock) returns."""
        self._pending.append(message)
        signal.pthread_kill(threading.main_thread().ident, WATCH_SIGNAL)

    def _handle(self, signum, frame) -> None:
        if self._pending:
            message = self._pending[-1]
            self._pending.clear()
            raise InferenceServerLost(message)
        previous = self._previous
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:  # the default action (SIGUSR1: terminate), as without the watch
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)


def exit_process(message: str) -> None:
    """SPMD mode: print ``message`` and end this rank's process at once with status 1 (see the module)."""
    sys.stderr.write(f"areal_a3po: {message} This rank exits now (status 1).\n")
    sys.stderr.flush()
    os._exit(1)


def _log_only(message: str) -> None:
    from areal.utils import logging

    logging.getLogger("A3PO").error("%s (not in the main thread, so the run is not stopped)", message)
