"""`optimer-merge demo`: the paper's experiment in miniature on CPU, with baselines and a report.

``pipeline`` runs the stages as resumable jobs, ``costs`` does the cost accounting,
``report`` writes report.md with the test leaderboard, plots and a verdict per paper claim, and
``seeds`` repeats the demo over seeds and gives each claim a 95% interval and a verdict from it.
The base every run starts from ships in ``base/`` (see ``optimer_merge.cpt.demo_base``).
"""

from optimer_merge.demo.pipeline import DemoJobFailed, DemoSettings, run_demo

__all__ = ["DemoJobFailed", "DemoSettings", "run_demo"]
