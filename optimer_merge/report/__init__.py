"""Reports: leaderboards from lm-eval results."""
