"""Plain next-token LM pretraining (the shared stage of :mod:`lmx.train.lm`, run as a method of its own)."""
from lmx.train.lm import STEPS_FIELD, run, validate

__all__ = ["run", "validate", "STEPS_FIELD"]
