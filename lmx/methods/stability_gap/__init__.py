"""Efficient continual pretraining and the stability gap: data strategies at one token budget, compared by
domain / general loss, probes and per-layer weight updates during continual pretraining."""
from lmx.methods.stability_gap.driver import STEPS_FIELD, run, validate

__all__ = ["run", "validate", "STEPS_FIELD"]
