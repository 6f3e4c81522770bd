"""Writing a benchmark's results: the JSON of all figures and the plot, each announced on stdout."""

from __future__ import annotations

import json
from typing import Any, Callable


def save(data: Any, json_path: str | None, draw: Callable[[str], None] | None = None, plot_path: str | None = None) -> None:
    """Write ``data`` to ``json_path`` and call ``draw(plot_path)``, each only when its path is given."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {json_path}")
    if plot_path and draw is not None:
        draw(plot_path)
        print(f"wrote {plot_path}")
