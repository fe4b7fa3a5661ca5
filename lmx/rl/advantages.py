"""Advantage estimators: truncation-aware GAE (reverse ``lax.scan``), GRPO, Dr.GRPO and RLOO group baselines.

Formulas: ``shared/methods/rl_losses.md`` §2. Everything here is a pure ``jnp`` function with static shapes, so it
jits, vmaps and differentiates; batches are ``[B, T]`` (batch-major, the LM layout) unless ``time_axis`` says
otherwise (PureJaxRL rollouts are time-major ``[T, N]``: pass ``time_axis=0``).

GAE's episode boundaries (gymnax 1.0 semantics):
  * ``terminated_t``: the step reached an absorbing state; nothing is bootstrapped past it.
  * ``truncated_t``: the episode was cut (time limit) at a state that has a future; the step bootstraps from
    ``bootstrap_values_t`` = V(the final observation before the auto-reset), but the GAE trace is still cut there
    (the next entry of the sequence belongs to a new episode). Termination wins when both are set.
  * ``mask_t = 0`` (padding): the step is skipped; the recursion links each valid step to the next valid one, and
    advantages and returns at padding are 0, so padding columns change nothing anywhere else.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _as_time_major(x, time_axis: int):
  return jnp.moveaxis(jnp.asarray(x), time_axis, 0)


def gae(rewards_BT, values_BT, last_value_B, terminated_BT, truncated_BT=None, bootstrap_values_BT=None,
        mask_BT=None, *, gamma: float = 0.99, lam: float = 0.95, time_axis: int = 1):
  """Generalised advantage estimation by a reverse ``lax.scan`` over time; returns ``(advantages, returns)``.

  ``δ_t = r_t + γ(1 − term_t)·V'_t − V_t`` with ``V'_t = bootstrap_values_t`` if ``truncated_t`` else the value of
  the next valid step (``last_value_B`` after the last one); ``A_t = δ_t + γλ(1 − done_t)·A_{t+1}`` with
  ``done = term ∨ trunc``; ``returns = A + V``. Shapes: ``[B, T]`` (or ``[T, B]`` with ``time_axis=0``), the value
  after the last step ``[B]``. ``truncated_BT``/``bootstrap_values_BT``/``mask_BT`` default to none truncated /
  zeros / all valid. No whitening here: see :func:`masked_whiten`.
  """
  r = _as_time_major(rewards_BT, time_axis).astype(jnp.float32)
  v = _as_time_major(values_BT, time_axis).astype(jnp.float32)
  term = _as_time_major(terminated_BT, time_axis).astype(bool)
  trunc = jnp.zeros_like(term) if truncated_BT is None else _as_time_major(truncated_BT, time_axis).astype(bool)
  boot = jnp.zeros_like(v) if bootstrap_values_BT is None else _as_time_major(bootstrap_values_BT, time_axis)
  m = jnp.ones_like(term) if mask_BT is None else _as_time_major(mask_BT, time_axis).astype(bool)
  last = jnp.broadcast_to(jnp.asarray(last_value_B, jnp.float32), v.shape[1:])

  def body(carry, xs):
    next_value, next_adv = carry
    r_t, v_t, term_t, trunc_t, boot_t, m_t = xs
    v_next = jnp.where(trunc_t, boot_t.astype(jnp.float32), next_value)
    delta = r_t + gamma * jnp.where(term_t, 0.0, v_next) - v_t
    adv = delta + gamma * lam * jnp.where(term_t | trunc_t, 0.0, next_adv)
    adv = jnp.where(m_t, adv, 0.0)  # also keeps NaN/Inf garbage at padding out of the outputs
    carry = (jnp.where(m_t, v_t, next_value), jnp.where(m_t, adv, next_adv))
    return carry, adv

  _, adv = jax.lax.scan(body, (last, jnp.zeros_like(last)), (r, v, term, trunc, boot, m), reverse=True)
  ret = jnp.where(m, adv + v, 0.0)
  return jnp.moveaxis(adv, 0, time_axis), jnp.moveaxis(ret, 0, time_axis)


def masked_mean(x, mask=None, axis=None):
  """Mean of ``x`` over ``mask`` (all of ``x`` when None); 0 where the mask is empty."""
  x = jnp.asarray(x)
  if mask is None:
    return jnp.mean(x, axis=axis)
  m = jnp.broadcast_to(jnp.asarray(mask, x.dtype), x.shape)
  return jnp.sum(jnp.where(m > 0, x, 0.0), axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1.0)


def masked_whiten(x, mask=None, *, shift_mean: bool = True, eps: float = 1e-8):
  """``(x − mean)/sqrt(var + eps)`` over the masked entries (population variance); 0 at padding."""
  x = jnp.asarray(x, jnp.float32)
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out if mask is None else jnp.where(jnp.asarray(mask) > 0, out, 0.0)


def _groups(rewards_B, group_size: int):
  r = jnp.asarray(rewards_B, jnp.float32)
  if r.ndim != 1 or r.shape[0] % group_size:
    raise ValueError(f"rewards must be [B] with B a multiple of group_size={group_size}, got shape {r.shape}")
  return r.reshape(-1, group_size)


def grpo_advantages(rewards_B, group_size: int, *, eps: float = 1e-6, ddof: int = 1):
  """GRPO: ``(R_i − mean_g R)/(std_g R + eps)`` per group of ``group_size`` consecutive responses, shape ``[B]``.

  The std is unbiased (``ddof=1``) as in EasyR1/verl and tunix; ``ddof=0`` gives numpy's population std (G=4
  advantages 1/1.1547 as large). Broadcast to tokens with ``adv[:, None] * mask_BT``.
  """
  if group_size < 2 and ddof >= 1:
    raise ValueError("grpo_advantages needs group_size >= 2 for an unbiased std (or pass ddof=0)")
  r = _groups(rewards_B, group_size)
  mean = r.mean(axis=1, keepdims=True)
  std = jnp.std(r, axis=1, keepdims=True, ddof=ddof)
  return ((r - mean) / (std + eps)).reshape(-1)


def drgrpo_advantages(rewards_B, group_size: int):
  """Dr.GRPO (arXiv 2503.20783): ``R_i − mean_g R``, no std division; pair it with the length-independent
  aggregation ``seq-mean-token-sum-norm`` (:func:`lmx.rl.losses.agg_loss`) and no KL term."""
  r = _groups(rewards_B, group_size)
  return (r - r.mean(axis=1, keepdims=True)).reshape(-1)


def rloo_advantages(rewards_B, group_size: int):
  """RLOO: ``R_i − (Σ_g R − R_i)/(G − 1)``, the reward minus the mean of the other responses of its group."""
  if group_size < 2:
    raise ValueError("rloo_advantages needs group_size >= 2 (a leave-one-out baseline)")
  r = _groups(rewards_B, group_size)
  return (r - (r.sum(axis=1, keepdims=True) - r) / (group_size - 1)).reshape(-1)


GROUP_ESTIMATORS = {"grpo": grpo_advantages, "drgrpo": drgrpo_advantages, "rloo": rloo_advantages}


def group_advantages(rewards_B, group_size: int, kind: str = "grpo"):
  """Group-baseline advantages by name: ``grpo``, ``drgrpo`` or ``rloo`` (see each function)."""
  if kind not in GROUP_ESTIMATORS:
    raise ValueError(f"unknown group advantage kind {kind!r}; choose one of {sorted(GROUP_ESTIMATORS)}")
  return GROUP_ESTIMATORS[kind](rewards_B, group_size)
