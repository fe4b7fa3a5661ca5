"""Multi-stage cable routing through hierarchical imitation learning (Luo, Xu et al. 2023): a learned route
primitive, scripted perturb / regrasp / go-to-next-clip primitives, a learned primitive selector with a
primitive-history embedding fine-tuned on corrections, in the 2-D PBD cable simulator of ``lmx.envs.cable``; and
the route BC policy on the Open X-Embodiment ``berkeley_cable_routing`` data set."""
from lmx.methods.cable_routing.driver import STEPS_FIELD, run, validate

__all__ = ["run", "validate", "STEPS_FIELD"]
