"""Self-Lengthen: a Generator and an Extender, both from one base, lengthen each other's outputs over
macro-iterations (two-stage split-and-continue extension, filters, length-biased drop), then a length-following
fine-tune with word-count constraints."""
from lmx.methods.self_lengthen.driver import STEPS_FIELD, run, validate

__all__ = ["run", "validate", "STEPS_FIELD"]
