"""Two runs with the same seed pick different free ports (``areal_a3po.ports``).

AReaL 1.0.4 draws ports from the global ``random``, seeded with ``config.seed`` in every process, so
every run with ``seed: 1`` starts its vLLM server on the same port (32735) and two such runs side by
side share it (vLLM binds with ``SO_REUSEPORT``). Each check runs in fresh processes, as AReaL's
workers do: they import the plugin's config (to read the experiment's), then seed, then pick ports.
"""

import json
import socket
import subprocess
import sys

from helpers import REPO

_RUN = """
import json, random
from areal.utils import seeding
from areal.utils.network import find_free_ports

def pick():  # what AReaL's rollout worker 0 does with seed: 1 before it starts its vLLM server
    seeding.set_random_seed(1, key="rollout0")
    return {"ports": find_free_ports(3), "after": random.random()}

alone = pick()
import areal_a3po.config  # as in every AReaL worker of a plugin run: it reads the experiment's config
plugin = pick()
seeding.set_random_seed(1, key="rollout0")
print(json.dumps({"alone": alone, "plugin": plugin, "first": random.random()}))  # the stream's first draw
"""


def _run() -> dict:
    out = subprocess.run([sys.executable, "-c", _RUN], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_runs_with_one_seed_pick_different_ports_and_keep_the_seeded_stream():
    runs = [_run(), _run()]
    # AReaL alone: the seeded stream's first draws, run after run (32735 is the vLLM server's port).
    assert runs[0]["alone"]["ports"] == runs[1]["alone"]["ports"]
    assert 32735 in runs[0]["alone"]["ports"]  # (sorted)
    # With the plugin's config imported.
    plugin = [run["plugin"] for run in runs]
    assert plugin[0]["ports"] != plugin[1]["ports"]
    assert 32735 not in plugin[0]["ports"] + plugin[1]["ports"]  # (1 in 3,800 that it is picked by chance)
    # The experiment's own stream is the seeded one, untouched by the port search: its first draw.
    first = runs[0]["first"]
    assert plugin[0]["after"] == plugin[1]["after"] == first
    assert runs[0]["alone"]["after"] != first  # AReaL's port search consumed it


def test_two_vllm_style_sockets_share_a_port_which_is_why_it_matters():
    # vLLM's create_server_socket: SO_REUSEADDR and SO_REUSEPORT. A second server on the same port
    # binds without an error, and the kernel splits the connections between the two.
    from vllm.entrypoints.openai.api_server import create_server_socket

    first = create_server_socket(("127.0.0.1", 0))
    port = first.getsockname()[1]
    second = create_server_socket(("127.0.0.1", port))
    try:
        assert second.getsockname()[1] == port
    finally:
        first.close()
        second.close()
    with socket.socket() as probe:  # a socket without SO_REUSEPORT is refused once one is bound
        holder = create_server_socket(("127.0.0.1", 0))
        try:
            try:
                probe.bind(("127.0.0.1", holder.getsockname()[1]))
                bound = True
            except OSError:
                bound = False
        finally:
            holder.close()
    assert not bound
