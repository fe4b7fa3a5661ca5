"""DATM / MTT dataset distillation by (difficulty-aligned) trajectory matching."""
from lmx.methods.datm.driver import STEPS_FIELD, run, validate

__all__ = ["run", "validate", "STEPS_FIELD"]
