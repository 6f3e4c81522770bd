"""Free ports that differ between runs: AReaL's free-port search gets a random stream of its own.

After ``use_private_port_stream()``, ``areal.utils.network.find_free_ports`` in this process draws its
candidate ports from a ``random.Random`` seeded by the OS. So:

- two runs started with the same ``config.seed`` probe different ports;
- the global ``random`` stream, which AReaL seeds with ``config.seed`` to make the experiment
  reproducible, is not consumed by port probes.

Why AReaL needs it: AReaL draws candidate ports from the global ``random``, seeded with
``config.seed`` in its controller and in every worker, so runs with one seed probe the same ports in
the same order. A port probed free is bound only later, so two such runs on one host can both pick
it; vLLM binds with ``SO_REUSEPORT``, and two servers then share one port without an error
(docs/areal-defects.md, defect 3).

``areal_a3po.config`` calls it at import: it takes effect in the controller and in every AReaL worker
that reads the experiment's config, before any port is chosen. Calling it again changes nothing.
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
