"""SPA's pure pieces: the progress estimator's heads and loss, the fused per-step reward, the released code's
leave-one-out overwrite and (T−k−1) weighting, and the placement of step rewards on action tokens.

Shapes: ``B`` episodes, ``K`` steps (padded; ``step_mask_BK`` marks real steps), ``D`` hidden size, ``V`` vocab,
``L`` tokens of a multi-turn sequence. Everything here is pure jnp and jit-safe.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lmx.rl.advantages import rloo_advantages

HEADS = ("hidden", "logits")
WEIGHTINGS = ("unit", "remaining")


def init_head(key, kind: str, *, d_model: int, vocab_size: int, hidden: int = 64):
  """Parameters of the estimator head. ``hidden`` (the paper): an MLP ``D → hidden → 1`` (GELU) on the
  backbone's final hidden state at a step's end. ``logits`` (the released code): ``Linear(V → 1)`` on the LM's
  output logits there. The last layer starts at zero, so an untrained head predicts ĉ = 0."""
  if kind not in HEADS:
    raise ValueError(f"estimator head {kind!r} is not one of {list(HEADS)}")
  if kind == "hidden":
    w1 = jax.random.normal(key, (d_model, hidden), jnp.float32) / jnp.sqrt(d_model)
    return {"w1": w1, "b1": jnp.zeros((hidden,)), "w2": jnp.zeros((hidden,)), "b2": jnp.zeros(())}
  return {"w": jnp.zeros((vocab_size,)), "b": jnp.zeros(())}


def apply_head(head, kind: str, h_BKD=None, logits_BKV=None):
  """ĉ ``[B, K]`` from the hidden state (``kind='hidden'``) or the logits (``'logits'``) at each step's end."""
  if kind == "hidden":
    z = jax.nn.gelu(jnp.asarray(h_BKD, jnp.float32) @ head["w1"] + head["b1"])
    return z @ head["w2"] + head["b2"]
  if kind == "logits":
    return jnp.asarray(logits_BKV, jnp.float32) @ head["w"] + head["b"]
  raise ValueError(f"estimator head {kind!r} is not one of {list(HEADS)}")


def progress_estimator_loss(c_hat_BK, step_mask_BK, reward_B, *, l2: float = 0.0, tol: float = 0.1):
  """SPA's estimator loss ``mean_b (R_b − Σ_k m_bk ĉ_bk)²`` (+ ``l2``·mean of ĉ² over real steps, not in the
  paper). Returns ``(loss, metrics)`` with ``mse``, ``mae`` and ``acc`` = fraction with ``|Σĉ − R| ≤ tol``
  (the code's logged "accuracy")."""
  m = jnp.asarray(step_mask_BK, jnp.float32)
  c = jnp.where(m > 0, jnp.asarray(c_hat_BK, jnp.float32), 0.0)
  err_B = jnp.sum(c, axis=1) - jnp.asarray(reward_B, jnp.float32)
  mse = jnp.mean(jnp.square(err_B))
  loss = mse
  if l2:
    loss = loss + l2 * jnp.sum(jnp.square(c)) / jnp.maximum(jnp.sum(m), 1.0)
  return loss, {"mse": mse, "mae": jnp.mean(jnp.abs(err_B)), "acc": jnp.mean(jnp.abs(err_B) <= tol)}


def grounding_bonus(valid_BK, step_mask_BK, *, beta: float = 0.5, final_always: bool = False):
  """``g_k = β·valid_k`` on real steps (``valid`` = the action was executable). ``final_always`` is the released
  code's rule that the last real step always gets β."""
  m = jnp.asarray(step_mask_BK, jnp.float32)
  g = beta * jnp.asarray(valid_BK, jnp.float32) * m
  if final_always:
    g = jnp.where(last_step_BK(step_mask_BK), beta, g)
  return g


def last_step_BK(step_mask_BK):
  """True at each episode's last real step (steps are a prefix: mask 1…1 0…0)."""
  m = jnp.asarray(step_mask_BK) > 0
  n_B = jnp.sum(m, axis=1)
  return m & (jnp.arange(m.shape[1])[None, :] == (n_B - 1)[:, None])


def step_weights(step_mask_BK, mode: str = "unit"):
  """Per-step reward weights: ``unit`` (1, the clean choice) or ``remaining`` = ``T − k − 1`` for 0-based step
  ``k`` of an episode of ``T`` real steps (StepTool's ``compute_rewards``, kept by SPA's released code: the last
  step gets weight 0)."""
  if mode not in WEIGHTINGS:
    raise ValueError(f"step weighting {mode!r} is not one of {list(WEIGHTINGS)}")
  m = jnp.asarray(step_mask_BK, jnp.float32)
  if mode == "unit":
    return m
  n_B = jnp.sum(m, axis=1, keepdims=True)
  return (n_B - jnp.arange(m.shape[1])[None, :] - 1.0) * m


def loo_overwrite(reward_B, step_mask_BK, group_size: int):
  """The released ``rl_data_org.py`` overwrite: every step's contribution becomes the episode's leave-one-out
  centred outcome ``R_i − mean_{j≠i} R_j`` over the ``group_size`` consecutive rollouts of its task."""
  adv_B = rloo_advantages(reward_B, group_size)
  return adv_B[:, None] * jnp.asarray(step_mask_BK, jnp.float32)


def fused_step_reward(c_hat_BK, valid_BK, step_mask_BK, *, alpha: float = 1.0, beta: float = 0.5,
                      final_always: bool = False, weighting: str = "unit"):
  """SPA's per-step reward ``r_k = w_k·(α·ĉ_k + g_k)`` with ``g`` from :func:`grounding_bonus` and ``w`` from
  :func:`step_weights` (``unit`` by default); 0 on padding steps."""
  m = jnp.asarray(step_mask_BK, jnp.float32)
  r = alpha * jnp.asarray(c_hat_BK, jnp.float32) * m + grounding_bonus(valid_BK, m, beta=beta,
                                                                         final_always=final_always)
  return r * step_weights(m, weighting)


def outcome_step_reward(reward_B, step_mask_BK):
  """The outcome-only reward: ``R`` on each episode's last real step, 0 elsewhere."""
  return jnp.where(last_step_BK(step_mask_BK), jnp.asarray(reward_B, jnp.float32)[:, None], 0.0)


def place_step_rewards(step_rewards_BK, step_end_BK, step_mask_BK, length: int):
  """Token-level rewards ``[B, length]``: step k's reward at its last action token ``step_end_BK[b, k]`` (the
  placement of StepTool/SPA's ``compute_rewards``), 0 elsewhere; masked steps add nothing."""
  r = jnp.where(jnp.asarray(step_mask_BK) > 0, jnp.asarray(step_rewards_BK, jnp.float32), 0.0)
  idx = jnp.clip(jnp.asarray(step_end_BK, jnp.int32), 0, length - 1)
  out = jnp.zeros((r.shape[0], length), jnp.float32)
  return jax.vmap(lambda o, i, v: o.at[i].add(v))(out, idx, r)
