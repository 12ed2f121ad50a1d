"""OptiMer: choose a continual pre-training data mixture after training, by searching merge weights."""

__version__ = "0.1.0"
