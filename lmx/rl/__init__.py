"""The shared RL core: advantage estimators, policy/value losses, KL estimators, aggregation modes, and a
PureJaxRL-style PPO (:mod:`lmx.rl.ppo`) that checks the core learns on CartPole, and rollouts of language
policies as training batches with the PPO/GRPO loss on them (:mod:`lmx.rl.rollout`)."""
from lmx.rl import rollout
from lmx.rl.advantages import (drgrpo_advantages, gae, group_advantages, grpo_advantages, masked_mean,
                               masked_whiten, rloo_advantages)
from lmx.rl.losses import (AGG_MODES, KL_KINDS, agg_loss, entropy_bonus, entropy_from_logits, kl_estimate,
                           ppo_policy_loss, ppo_policy_loss_per_token, value_loss)

__all__ = ["AGG_MODES", "rollout", "KL_KINDS", "agg_loss", "drgrpo_advantages", "entropy_bonus", "entropy_from_logits", "gae",
           "group_advantages", "grpo_advantages", "kl_estimate", "masked_mean", "masked_whiten",
           "ppo_policy_loss", "ppo_policy_loss_per_token", "rloo_advantages", "value_loss"]
