"""Policy-gradient losses: clipped PPO (decoupled ε, dual clip), clipped value loss, entropy, KL estimators and
the loss-aggregation modes. Formulas: ``shared/methods/rl_losses.md`` §3–§5 (verl/EasyR1 ``core_algos``, tunix
``grpo_core``).

All functions are pure ``jnp``; per-token quantities are ``[B, T]`` with a ``mask_BT`` (1 = a token that counts).
Padding positions never reach a result: they are replaced by 0 before any arithmetic that could turn garbage
(NaN/Inf log-probs) into NaN gradients, and every aggregation divides by mask counts only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_LOG_RATIO_LIMIT = 20.0  # tunix clamps the log-ratio to ±20 before exp


def _mask(mask_BT, like):
  if mask_BT is None:
    return jnp.ones(jnp.shape(like), jnp.float32)
  return jnp.broadcast_to(jnp.asarray(mask_BT, jnp.float32), jnp.shape(like))


def agg_loss(loss_BT, mask_BT=None, mode: str = "token-mean", norm: float | None = None):
  """Aggregates a per-token loss ``[B, T]`` (or ``[N]``, one token per row) into a scalar.

  ``token-mean``               Σ(L·m)/Σm                     (DAPO; PPO on classic control)
  ``seq-mean-token-mean``      mean_i[Σ_t L·m / Σ_t m]       (classic GRPO)
  ``seq-mean-token-sum``       mean_i Σ_t L·m
  ``seq-mean-token-sum-norm``  Σ_{i,t} L·m / norm            (Dr.GRPO; ``norm`` = the padded length T by default,
                                                              a constant, as verl's ``loss_scale_factor``)
  The sequence means run over rows with at least one unmasked token, so an all-padding row changes nothing.
  """
  loss = jnp.asarray(loss_BT, jnp.float32)
  if loss.ndim == 1:
    loss = loss[:, None]
    mask_BT = None if mask_BT is None else jnp.asarray(mask_BT)[:, None]
  m = _mask(mask_BT, loss)
  lm = jnp.where(m > 0, loss, 0.0) * m
  if mode == "token-mean":
    return lm.sum() / jnp.maximum(m.sum(), 1.0)
  tok_per_seq = m.sum(axis=-1)
  seq_valid = (tok_per_seq > 0).astype(jnp.float32)
  n_seq = jnp.maximum(seq_valid.sum(), 1.0)
  if mode == "seq-mean-token-mean":
    return (lm.sum(axis=-1) / jnp.maximum(tok_per_seq, 1.0) * seq_valid).sum() / n_seq
  if mode == "seq-mean-token-sum":
    return lm.sum() / n_seq
  if mode == "seq-mean-token-sum-norm":
    return lm.sum() / (loss.shape[-1] if norm is None else norm)
  raise ValueError(f"unknown loss aggregation mode {mode!r}; choose one of {AGG_MODES}")


def ppo_policy_loss_per_token(logp_BT, old_logp_BT, advantages_BT, mask_BT=None, *, clip_low: float = 0.2,
                              clip_high: float | None = None, dual_clip: float | None = 3.0):
  """Per-token clipped PPO surrogate ``[B, T]`` and its diagnostics (0 at padding).

  ``L1 = −A·r``, ``L2 = −A·clip(r, 1 − ε_low, 1 + ε_high)``, ``Lc = max(L1, L2)``; with ``dual_clip = c`` (> 1)
  tokens with ``A < 0`` take ``min(Lc, −c·A)``. ``r = exp(logp − old_logp)`` with the log-ratio clamped to ±20.
  ``clip_high`` defaults to ``clip_low`` (symmetric PPO; DAPO's clip-higher uses 0.28).
  Diagnostics (token means over the mask): ``clipfrac_high`` = [L1 < L2], ``clipfrac_low`` = [Lc > −cA, A < 0],
  ``ppo_kl`` = mean(−ℓ).
  """
  clip_high = clip_low if clip_high is None else clip_high
  m = _mask(mask_BT, logp_BT)
  valid = m > 0
  log_ratio = jnp.where(valid, jnp.asarray(logp_BT, jnp.float32) - jnp.asarray(old_logp_BT, jnp.float32), 0.0)
  adv = jnp.where(valid, jnp.asarray(advantages_BT, jnp.float32), 0.0)
  ratio = jnp.exp(jnp.clip(log_ratio, -_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT))
  l1 = -adv * ratio
  l2 = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  lc = jnp.maximum(l1, l2)
  if dual_clip is not None:
    if dual_clip <= 1.0:
      raise ValueError(f"dual_clip must be > 1 (the paper's c = 3), got {dual_clip}")
    l3 = jnp.minimum(lc, -dual_clip * adv)
    loss = jnp.where(adv < 0, l3, lc)
    low = (lc > -dual_clip * adv) & (adv < 0)
  else:
    loss, low = lc, jnp.zeros_like(valid)
  loss = jnp.where(valid, loss, 0.0)
  metrics = {"clipfrac_high": agg_loss((l1 < l2).astype(jnp.float32), m),
             "clipfrac_low": agg_loss(low.astype(jnp.float32), m),
             "ppo_kl": agg_loss(-log_ratio, m)}
  return loss, metrics


def ppo_policy_loss(logp_BT, old_logp_BT, advantages_BT, mask_BT=None, *, clip_low: float = 0.2,
                    clip_high: float | None = None, dual_clip: float | None = 3.0, agg: str = "token-mean",
                    norm: float | None = None):
  """Clipped PPO policy loss aggregated by ``agg`` (:func:`agg_loss`); returns ``(loss, metrics)``."""
  per_tok, metrics = ppo_policy_loss_per_token(logp_BT, old_logp_BT, advantages_BT, mask_BT, clip_low=clip_low,
                                               clip_high=clip_high, dual_clip=dual_clip)
  return agg_loss(per_tok, mask_BT, agg, norm), metrics


def value_loss(values_BT, old_values_BT, returns_BT, mask_BT=None, *, clip: float | None = 0.2,
               agg: str = "token-mean", norm: float | None = None):
  """``0.5·max((V − R)², (clip(V, V_old ± ε_v) − R)²)`` aggregated by ``agg``; ``clip=None`` is the plain
  ``0.5·(V − R)²``. Returns ``(loss, metrics)`` with ``vf_clipfrac`` (the clipped branch is larger)."""
  m = _mask(mask_BT, values_BT)
  valid = m > 0
  v = jnp.where(valid, jnp.asarray(values_BT, jnp.float32), 0.0)
  ret = jnp.where(valid, jnp.asarray(returns_BT, jnp.float32), 0.0)
  unclipped = jnp.square(v - ret)
  if clip is None:
    per_tok, frac = 0.5 * unclipped, jnp.zeros_like(unclipped)
  else:
    old = jnp.where(valid, jnp.asarray(old_values_BT, jnp.float32), 0.0)
    clipped = jnp.square(old + jnp.clip(v - old, -clip, clip) - ret)
    per_tok, frac = 0.5 * jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32)
  return agg_loss(per_tok, m, agg, norm), {"vf_clipfrac": agg_loss(frac, m)}


def entropy_from_logits(logits_BTV):
  """Exact entropy ``−Σ_v p log p`` of categorical logits over the last axis, shape ``[B, T]``."""
  logp = jax.nn.log_softmax(jnp.asarray(logits_BTV, jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def entropy_bonus(entropy_BT, mask_BT=None, *, coef: float = 0.01, agg: str = "token-mean",
                  norm: float | None = None):
  """The loss term ``−coef·agg(entropy)`` (added to the loss: minimising it raises entropy)."""
  return -coef * agg_loss(entropy_BT, mask_BT, agg, norm)


KL_KINDS = ("k1", "abs", "k2", "k3")
_KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}


def kl_estimate(logp_BT, ref_logp_BT, kind: str = "k3", mask_BT=None):
  """Per-token KL estimator of π_θ to the reference from sampled tokens' log-probs; ``x = logπθ − logπ_ref``.

  ``k1`` (alias ``kl``): x · ``abs``: |x| · ``k2`` (``mse``): ½x² · ``k3`` (``low_var_kl``): ``e^{−x} + x − 1``
  clamped to [−10, 10] (non-negative, unbiased for KL(π_θ‖π_ref) under samples of π_θ). 0 at padding.
  """
  kind = _KL_ALIASES.get(kind, kind)
  m = _mask(mask_BT, logp_BT)
  x = jnp.where(m > 0, jnp.asarray(logp_BT, jnp.float32) - jnp.asarray(ref_logp_BT, jnp.float32), 0.0)
  if kind == "k1":
    out = x
  elif kind == "abs":
    out = jnp.abs(x)
  elif kind == "k2":
    out = 0.5 * jnp.square(x)
  elif kind == "k3":
    # Clamp the exponent first: e^{-x} overflows for x < -88 in float32 and the result is clamped anyway.
    out = jnp.clip(jnp.exp(jnp.clip(-x, -20.0, 20.0)) + x - 1.0, -10.0, 10.0)
  else:
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {KL_KINDS} (or {sorted(_KL_ALIASES)})")
  return jnp.where(m > 0, out, 0.0)
