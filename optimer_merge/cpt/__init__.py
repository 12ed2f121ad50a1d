"""Continual pre-training on Lightning Fabric: one dataset, static mixtures, or Velocitune.

``config`` holds the typed run configuration, ``datasets`` turns corpora and user files into
packed token blocks and mixes them, ``velocitune`` holds the dynamic reweighting rule,
``trainer`` runs the loop, and ``demo_base`` builds the demo's tiny base (shipped in optimer_merge/demo/base).
"""

from optimer_merge.cpt.config import DatasetSpec, TrainConfig, VelocituneConfig, load_config

__all__ = ["DatasetSpec", "TrainConfig", "VelocituneConfig", "load_config", "train"]


def train(config: TrainConfig, **kwargs):
    """Run (or resume) one CPT run; see `optimer_merge.cpt.trainer.train`."""
    from optimer_merge.cpt.trainer import train as _train

    return _train(config, **kwargs)
