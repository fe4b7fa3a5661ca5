"""LET (Late-to-Early Training): a small trained teacher's late features guide an early student layer early on."""
from lmx.methods.let.driver import STEPS_FIELD, run, validate

__all__ = ["run", "validate", "STEPS_FIELD"]
