"""SEIF (Self-Evolving RL for Instruction Following) in miniature: an Instructor LM proposes verifiable constraint
sets (rewarded 1 − adherence of the frozen Follower when the Filter accepts them), a Follower LM learns to follow
them (rewarded by adherence), alternating GRPO rounds; random-instruction and no-Filter baselines."""
from lmx.methods.seif.driver import STEPS_FIELD, run, validate

__all__ = ["run", "validate", "STEPS_FIELD"]
