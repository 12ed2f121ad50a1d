"""matplotlib on the Agg backend, shared by every figure the project draws."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path) -> None:
    """Write ``fig`` as PNG to ``path`` whole or not at all (a temporary name, then renamed), and
    close it."""
    from optimer_merge.io.files import written_whole

    try:
        with written_whole(path) as partial:
            fig.savefig(partial, dpi=110, format="png")
    finally:
        pyplot().close(fig)
