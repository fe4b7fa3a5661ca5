"""DATM / MTT dataset distillation by (difficulty-aligned) trajectory matching."""
from lmx.methods.datm.run import run
from lmx.methods.datm.validate import validate

STEPS_FIELD = "distill.iterations"
# Fields a resume may change (the launcher refuses any other change): cadences, the NaN patience, how the
# evaluation is run (it happens after the distillation, from scratch), and numerics-neutral implementation choices.
# The periodic evaluation only reads the state (its best-set record is re-measured when eval_nets/epochs change).
SAFE_TO_CHANGE = ("distill.log_every", "distill.ckpt_every", "distill.max_nonfinite", "eval.*", "experts.parallel",
                  "experts.vmap", "model.conv_impl", "experts.fwd_chunk_experts", "experts.fwd_chunk_images",
                  "distill.eval_every", "distill.eval_nets", "distill.eval_epochs")

__all__ = ["run", "validate", "STEPS_FIELD", "SAFE_TO_CHANGE"]
