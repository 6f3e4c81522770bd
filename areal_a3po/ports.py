"""Free ports that differ between runs: AReaL's port search gets a random stream of its own.

AReaL 1.0.4 is wrong for us here. ``areal.utils.network.find_free_ports`` draws candidate ports
from the global ``random`` module, which AReaL's controller and every worker seed with
``config.seed`` (``seeding.set_random_seed(config.seed, key=f"{role}{rank}")``). So every run with
the same seed probes the same ports in the same order: with ``seed: 1`` the trainer workers get
13413 and 26594, and the rollout worker starts its vLLM server on 32735, run after run. A port
that is probed free is bound only later (a vLLM server binds about a minute after the probe on a
CPU, several minutes on a busy machine), so two experiments with the same seed started together on
one host both pick it. vLLM binds its API socket with ``SO_REUSEPORT``: both servers then listen
on the same port and the kernel splits the connections between them, so each run's rollouts and
weight updates go partly to the other run's server, silently. A worker's RPC port (no
``SO_REUSEPORT``) fails instead ("Address already in use"; seen with two test runs side by side).

``use_private_port_stream()`` gives AReaL's network module a ``random.Random`` of its own, seeded by
the OS: the ports differ between runs, and the global ``random`` stream that the experiment's seed
makes reproducible is no longer consumed by port probes. The module that reads the experiment's
config calls it (``areal_a3po.config``), so it takes effect in the controller and in every worker
that receives the config, before any port is chosen.
"""

from __future__ import annotations

import random


def use_private_port_stream() -> random.Random:
    """Make ``areal.utils.network``'s ``random`` an OS-seeded ``random.Random`` (once per process);
    returns it."""
    import areal.utils.network as network

    if not isinstance(network.random, random.Random):
        network.random = random.Random()  # seeded from os.urandom
    return network.random
