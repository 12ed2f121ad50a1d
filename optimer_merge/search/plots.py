"""Search plots: the score of every trial with the best so far, and the best weights as ratios."""

from __future__ import annotations

from pathlib import Path

from optimer_merge.report.plots import pyplot, save


def plot_trace(records: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ok = [(r["trial"], r["score"]) for r in records if r["status"] == "ok"]
    failed = [r["trial"] for r in records if r["status"] != "ok"]
    if ok:
        ax.scatter([t for t, _ in ok], [s for _, s in ok], s=14, label="trial score")
        best, xs, ys = float("-inf"), [], []
        for t, s in ok:
            best = max(best, s)
            xs.append(t)
            ys.append(best)
        ax.step(xs, ys, where="post", color="C1", label="best so far")
    for i, t in enumerate(failed):
        ax.axvline(t, color="C3", alpha=0.3, lw=1, label="failed" if i == 0 else None)
    ax.set_xlabel("trial")
    ax.set_ylabel("objective score (higher is better)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, path)


def plot_weights(weights: dict[str, float], ratios: dict[str, float] | None, path: Path) -> None:
    plt = pyplot()
    names = list(weights)
    fig, axes = plt.subplots(1, 2 if ratios else 1, figsize=(9 if ratios else 5, 3.6), squeeze=False)
    axes[0][0].bar(names, [weights[n] for n in names], color="C0")
    axes[0][0].set_title("best merge weights w_i")
    if ratios:
        axes[0][1].bar(names, [ratios[n] for n in names], color="C2")
        axes[0][1].set_title("as mixture ratios (w_i / sum w)")
    for ax in axes[0]:
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save(fig, path)
