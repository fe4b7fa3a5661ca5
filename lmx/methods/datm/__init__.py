"""DATM / MTT dataset distillation by (difficulty-aligned) trajectory matching."""
from lmx.methods.datm.run import run

__all__ = ["run"]
