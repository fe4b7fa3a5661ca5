"""Plain next-token LM pretraining."""
from lmx.methods.lm.run import SAFE_TO_CHANGE, STEPS_FIELD, run, validate

__all__ = ["run", "validate", "STEPS_FIELD", "SAFE_TO_CHANGE"]
