"""`optimer-merge demo`: the paper's experiment in miniature on CPU, with baselines and a report.

``pipeline`` runs the stages as resumable jobs, ``costs`` does the cost accounting and
``report`` writes report.md with the test leaderboard, plots and a verdict per paper claim.
"""

from optimer_merge.demo.pipeline import DemoJobFailed, DemoSettings, run_demo

__all__ = ["DemoJobFailed", "DemoSettings", "run_demo"]
