"""SEIF at the paper's scale: Qwen2.5-7B-Instruct Follower/Instructor, GRPO with the released config.

Both roles share one GRPO step (:func:`lmx.rl.rollout.policy_loss_fn`: clipped PPO with ε_low 0.2, ε_high 0.3,
dual clip 3, k3 KL as a loss with β = 0.01 to the frozen reference ``frozen["ref_params"]``, token-mean) in
:func:`lmx.core.loop.optax_step` with AdamW (lr 1e-6, weight decay 1e-2, clip 1.0; ``paper.optim`` through
:func:`lmx.core.optim.make_optimizer`). :func:`lower_step` lowers it
for a GPU target from abstract shapes (nothing of paper size is allocated): a micro-batch of ``micro_batch`` rows
of ``max_prompt + max_response`` tokens. A real run reads the checkpoint with ``model.name='hf'``
(:mod:`lmx.models.hf`, ``paper.hf_path``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from lmx.core.loop import optax_state, optax_step
from lmx.core.optim import make_optimizer
from lmx.models.registry import build_model
from lmx.rl import rollout


def paper_model(config):
  """The registry Model of ``config.paper.model`` (the architecture only; no weights are read)."""
  return build_model(ml_collections.ConfigDict(config.paper.model.to_dict()))


def make_step(model, config):
  """``(jitted step(state, frozen, batch, rng), tx)`` with the paper's GRPO loss and optimiser."""
  p, g = config.paper, config.grpo
  tx, _ = make_optimizer(p.optim, 1)
  loss = rollout.policy_loss_fn(model.apply, clip_low=g.clip_low, clip_high=g.clip_high, dual_clip=g.dual_clip,
                                kl_coef=g.kl_coef, kl_kind=g.kl_kind, agg=g.agg)
  return jax.jit(optax_step(loss, tx), donate_argnums=(0,)), tx


def abstract_batch(config, rows: int | None = None):
  p = config.paper
  b, t = int(rows or p.micro_batch), int(p.max_prompt + p.max_response)
  sd = jax.ShapeDtypeStruct
  return {"tokens_BT": sd((b, t), jnp.int32), "segment_ids_BT": sd((b, t), jnp.int32),
          "positions_BT": sd((b, t), jnp.int32), "loss_mask_BT": sd((b, t), jnp.float32),
          "old_logp_BT": sd((b, t), jnp.float32), "advantages_BT": sd((b, t), jnp.float32)}


def lower_step(config, platforms=("cuda",), rows: int | None = None):
  """The GRPO step lowered for ``platforms`` from abstract shapes; returns ``(lowered, model)``."""
  model = paper_model(config)
  step, tx = make_step(model, config)
  params = model.abstract_params()
  state = jax.eval_shape(lambda p: optax_state(p, tx), params)
  low = step.trace(state, {"ref_params": params}, abstract_batch(config, rows), None).lower(
      lowering_platforms=tuple(platforms))
  return low, model
