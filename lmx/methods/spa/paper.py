"""SPA at the paper's scale: a Llama/Qwen policy generating ReAct actions in multi-turn ALFWorld episodes.

The CPU miniature (:mod:`.run`) scores candidate commands; at paper scale the policy *generates* each action and
one episode is one token sequence (:func:`lmx.rl.rollout.turns_batch`: observations and actions concatenated,
``loss_mask_BT`` on action tokens, ``step_end_BK`` the last token of each action). Two jitted steps:

  ``estimator_step``  the progress estimator (the SFT LM + a head at each step's end, hidden or logits variant)
                      trained on ``mean_b (R_b − Σ_k ĉ_bk)²``;
  ``ppo_step``        token-level PPO on the action tokens (:func:`lmx.rl.rollout.policy_loss_fn`: clipped, dual
                      clip, KL to the frozen reference ``frozen["ref_params"]`` at ``kl_coef`` 0.3 as in the
                      released config), with advantages from token-level GAE over rewards placed at step ends
                      (:func:`.progress.place_step_rewards` of :func:`.progress.fused_step_reward`).

:func:`lower_for` lowers both for a GPU target from abstract shapes (nothing of paper size is allocated).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lmx.core.loop import optax_state, optax_step
from lmx.core.optim import make_optimizer
from lmx.methods.spa import progress
from lmx.rl import rollout


def estimator_loss_fn(apply_fn, head_kind: str):
  """``loss(params, frozen, batch, rng)`` with params ``{"lm", "head"}`` and a :func:`turns_batch` batch plus
  ``reward_B``."""

  def loss(params, frozen, b, rng):
    del frozen, rng
    logits, hiddens = apply_fn(params["lm"], b["tokens_BT"], segment_ids_BT=b["segment_ids_BT"],
                               positions_BT=b["positions_BT"], hidden_layers=(-1,))
    rows = jnp.arange(b["tokens_BT"].shape[0])[:, None]
    if head_kind == "hidden":
      c = progress.apply_head(params["head"], "hidden", h_BKD=hiddens["final"][rows, b["step_end_BK"]])
    else:
      c = progress.apply_head(params["head"], "logits", logits_BKV=logits[rows, b["step_end_BK"]])
    return progress.progress_estimator_loss(c, b["step_mask_BK"], b["reward_B"])

  return loss


def make_steps(model, config):
  """(estimator_step, ppo_step, estimator tx, ppo tx) for ``model`` (a registry Model) under ``config``; the
  optimisers are ``estimator.optim`` and ``rl.optim``."""
  from lmx.methods.spa.driver import max_iterations

  r, e = config.rl, config.estimator
  ppo_tx, _ = make_optimizer(r.optim, max_iterations(config))
  est_tx, _ = make_optimizer(e.optim, e.steps)
  ppo_loss = rollout.policy_loss_fn(model.apply, clip_low=r.clip, kl_coef=0.3, kl_kind="k1",
                                    entropy_coef=r.ent_coef, agg="token-mean")
  return (jax.jit(optax_step(estimator_loss_fn(model.apply, e.head), est_tx)), jax.jit(optax_step(ppo_loss, ppo_tx)),
          est_tx, ppo_tx)


def abstract_batch(config, model):
  p = config.paper
  B, T, K = p.batch, p.seq_len, config.shapes.max_steps
  i32, f32 = jnp.int32, jnp.float32
  sd = jax.ShapeDtypeStruct
  return {"tokens_BT": sd((B, T), i32), "segment_ids_BT": sd((B, T), i32), "positions_BT": sd((B, T), i32),
          "loss_mask_BT": sd((B, T), f32), "old_logp_BT": sd((B, T), f32), "advantages_BT": sd((B, T), f32),
          "step_end_BK": sd((B, K), i32), "step_mask_BK": sd((B, K), f32), "reward_B": sd((B,), f32)}


def lower_for(config, model, platforms=("cuda",)):
  """Lowers the estimator and PPO steps for ``platforms`` from abstract shapes; returns the two Lowered."""
  est_step, ppo_step, est_tx, ppo_tx = make_steps(model, config)
  lm = model.abstract_params()
  head = jax.eval_shape(lambda k: progress.init_head(k, config.estimator.head, d_model=model.cfg.d_model,
                                                     vocab_size=model.cfg.vocab_size,
                                                     hidden=config.estimator.hidden), jax.random.key(0))
  est_state = jax.eval_shape(lambda p: optax_state(p, est_tx), {"lm": lm, "head": head})
  ppo_state = jax.eval_shape(lambda p: optax_state(p, ppo_tx), lm)
  b = abstract_batch(config, model)
  ppo_b = {k: v for k, v in b.items() if k in rollout.BATCH_KEYS}
  low_e = est_step.trace(est_state, {}, b, None).lower(lowering_platforms=tuple(platforms))
  low_p = ppo_step.trace(ppo_state, {"ref_params": lm}, ppo_b, None).lower(lowering_platforms=tuple(platforms))
  return low_e, low_p
