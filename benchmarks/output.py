"""What every benchmark runner shares: its command line's output options, the files it writes, its
text tables and its plots.

- ``parser(__doc__)``, then the runner's own options, then ``output_options``: ``--dry-run`` (where the
  runner has one), ``--json`` and ``--plot`` (where it draws one);
- ``save(data, args, draw)``: the JSON of all figures and the plot, each announced on stdout;
- ``table``: a plain text table (tabulate, which AReaL requires);
- ``figure``: a matplotlib figure written to a PNG (no display needed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any, Callable, Iterable, Iterator, Sequence


def parser(doc: str) -> argparse.ArgumentParser:
    """A runner's parser: its module docstring as the description, laid out as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def output_options(
    parser: argparse.ArgumentParser,
    *,
    json: str = "write all figures to this file",
    plot: str | None = None,
    dry_run: str | None = None,
) -> argparse.ArgumentParser:
    """Add ``--dry-run`` (with ``dry_run`` as its help, where given), ``--json`` and ``--plot`` (with
    ``plot``, what it draws, as its help, where given)."""
    if dry_run is not None:
        parser.add_argument("--dry-run", action="store_true", help=dry_run)
    parser.add_argument("--json", help=json)
    if plot is not None:
        parser.add_argument("--plot", help=plot)
    return parser


def save(data: Any, args: argparse.Namespace, draw: Callable[[str], None] | None = None) -> None:
    """Write ``data`` to ``args.json`` and call ``draw(args.plot)``, each only where its path is given."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {args.json}")
    plot_path = getattr(args, "plot", None)
    if plot_path and draw is not None:
        draw(plot_path)
        print(f"wrote {plot_path}")


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str], align: str | None = None) -> str:
    """``rows`` under ``headers`` in aligned columns, each cell as given (format numbers before).
    ``align``: one letter a column, ``l`` (left) or ``r`` (right); default: the first column left,
    the others right. A header may hold a line break (a second header line)."""
    from tabulate import tabulate

    align = align or "l" + "r" * (len(headers) - 1)
    sides = tuple({"l": "left", "r": "right"}[a] for a in align)
    return tabulate([[str(c) for c in row] for row in rows], headers, tablefmt="plain", disable_numparse=True,
                    colalign=sides)


@contextlib.contextmanager
def figure(path: str, nrows: int = 1, ncols: int = 1, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """``plt.subplots(nrows, ncols, **subplots)`` as ``(fig, axes)``, on a backend that needs no display;
    on leaving the block, laid out and written to ``path`` (PNG, 120 dpi). The figure is closed either way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
