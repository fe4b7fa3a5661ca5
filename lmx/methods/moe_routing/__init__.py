"""MoE routing phases (Mouzouni 2026): γ_eff of the routing congestion game, load balance and their evolution
over checkpoints, for lmx's MoE or any MoE's exported routing records."""
from lmx.methods.moe_routing.driver import STEPS_FIELD, run, validate

__all__ = ["run", "validate", "STEPS_FIELD"]
