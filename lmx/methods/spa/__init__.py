"""SPA-RL (Wang et al. 2025, arXiv 2505.20732): stepwise progress attribution for LLM agents, on TextWorld games."""
from lmx.methods.spa.driver import STEPS_FIELD, run, validate

__all__ = ["run", "validate", "STEPS_FIELD"]
