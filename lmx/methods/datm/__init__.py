"""DATM / MTT dataset distillation by (difficulty-aligned) trajectory matching."""
from lmx.methods.datm.driver import SAFE_TO_CHANGE, STEPS_FIELD, run, validate

__all__ = ["run", "validate", "STEPS_FIELD", "SAFE_TO_CHANGE"]
