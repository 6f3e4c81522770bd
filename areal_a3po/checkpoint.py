"""The A-3PO state in AReaL's checkpoints: ``a3po_state.json`` next to the weights.

The state is the fallback's mode (and its streaks), which every rank must resume with alike: a rank
that resumed in ``recompute`` mode runs AReaL's recompute forward, a collective, that a rank in
``approximate`` mode never joins. So one rank does the file I/O for all:

- ``save_state``: rank 0 writes the file atomically (a temporary file in the same folder, flushed to
  disk, then renamed over the old one), so a crash mid-write leaves the previous state, not a cut
  file that every rank then fails to read;
- ``load_state``: rank 0 reads it and sends it to every rank (one broadcast), also where the other
  ranks cannot see the file (a node-local disk); a missing file is None, an unreadable one the
  same named error on every rank.

Only checkpoints a run resumes from carry the state (``resumable``: AReaL's recover checkpoints, in
DCP format); the Saver's Hugging Face exports, which are read by evaluation and serving, do not.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from areal_a3po.ranks import broadcast_from_rank_zero

__all__ = ["STATE_FILE", "load_state", "resumable", "save_state", "write_atomically"]

#: The A-3PO state saved with each checkpoint of the actor (AReaL's recover checkpoints included).
STATE_FILE = "a3po_state.json"


def resumable(meta: Any) -> bool:
    """Whether AReaL's ``SaveLoadMeta`` is a checkpoint a run resumes from: AReaL's recover checkpoints
    are DCP (``RecoverHandler``); ``weight_format: hf`` is the Saver's export (and the LoRA start)."""
    return getattr(meta, "weight_format", None) != "hf"


def write_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old file or the new one, never a part."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_state(folder: str, state: dict[str, Any]) -> None:
    """Write ``state`` as ``folder/STATE_FILE`` (rank 0; an error there is raised on every rank)."""
    path = os.path.join(folder, STATE_FILE)
    broadcast_from_rank_zero(lambda: write_atomically(path, json.dumps(state, indent=1, ensure_ascii=False)))


def _read(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # a cut or foreign file: bytes that are not JSON
        raise ValueError(
            f"A-3PO: the checkpoint's {path} is not valid JSON ({exc}). Restore it from a copy, or delete it "
            "to resume with the fallback in 'approximate' mode."
        ) from None


def load_state(folder: str) -> dict[str, Any] | None:
    """``folder/STATE_FILE`` as rank 0 reads it, on every rank; None when the checkpoint has none."""
    path = os.path.join(folder, STATE_FILE)
    return broadcast_from_rank_zero(lambda: _read(path))
