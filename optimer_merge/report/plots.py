"""matplotlib on the Agg backend, shared by every figure the project draws."""

from __future__ import annotations

import os
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
    path = Path(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        fig.savefig(partial, dpi=110, format="png")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
        pyplot().close(fig)
