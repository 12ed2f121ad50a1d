"""matplotlib on the Agg backend, shared by every figure the project draws."""

from __future__ import annotations


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
